/*
 * A user's last H events, kept incrementally: recloop's Flink job
 * (recloop.streaming.flink.job) calls it per user,
 *
 *   SELECT user_id, recloop_recent_events(ts, event_id, item_id, reward, H)
 *   FROM valid_events GROUP BY user_id
 *
 * in place of a SQL Top-N per user (ROW_NUMBER ... rn <= H) and a LISTAGG of it, whose rank
 * retracts a row and whose LISTAGG rebuilds the list for every event past the H-th.  Events
 * are ordered by (ts, event id), the id in code point order (the Redis store's sorted set
 * orders equal times by member bytes, UTF-8: the same order); an event id already kept is
 * not added again (the first version wins, as the store's HSETNX and the behaviour log).
 *
 * getValue returns the list oldest first as JSON, [[ts, "event id", "item id", reward], ...].
 */
package recloop.flink.udf;

import java.util.ArrayList;
import java.util.List;
import org.apache.flink.table.annotation.DataTypeHint;
import org.apache.flink.table.annotation.FunctionHint;
import org.apache.flink.table.functions.AggregateFunction;

// The accumulator as a RAW value: Flink keeps the Java object itself in the state and hands it
// to accumulate/getValue as it is.  As a structured type, every row converted the whole
// accumulator (list) to Flink's internal format and back, which cost more than the work.
@FunctionHint(accumulator = @DataTypeHint(value = "RAW", bridgedTo = RecentEvents.Acc.class))
public class RecentEvents extends AggregateFunction<String, RecentEvents.Acc> {

    /** The kept events, oldest first, as parallel lists (at most cap of them). */
    public static class Acc {
        public List<Long> ts = new ArrayList<>();
        public List<String> eventIds = new ArrayList<>();
        public List<String> items = new ArrayList<>();
        public List<Double> rewards = new ArrayList<>();
    }

    @Override
    public Acc createAccumulator() {
        return new Acc();
    }

    public void accumulate(
            Acc acc, Long ts, String eventId, String item, Double reward, Integer cap) {
        if (ts == null || eventId == null || item == null || cap == null || cap < 1) {
            return;
        }
        if (acc.eventIds.contains(eventId)) {
            return;
        }
        // Insertion point: after every kept event that orders before (ts, eventId).
        int at = acc.ts.size();
        while (at > 0 && before(ts, eventId, acc.ts.get(at - 1), acc.eventIds.get(at - 1))) {
            at--;
        }
        if (acc.ts.size() >= cap && at == 0) {
            return; // older than every kept event of a full list
        }
        acc.ts.add(at, ts);
        acc.eventIds.add(at, eventId);
        acc.items.add(at, item);
        acc.rewards.add(at, reward == null ? 1.0 : reward);
        while (acc.ts.size() > cap) {
            acc.ts.remove(0);
            acc.eventIds.remove(0);
            acc.items.remove(0);
            acc.rewards.remove(0);
        }
    }

    @Override
    public String getValue(Acc acc) {
        StringBuilder json = new StringBuilder("[");
        for (int i = 0; i < acc.ts.size(); i++) {
            if (i > 0) {
                json.append(',');
            }
            json.append('[').append(acc.ts.get(i)).append(',');
            TopCounts.quote(json, acc.eventIds.get(i));
            json.append(',');
            TopCounts.quote(json, acc.items.get(i));
            json.append(',').append(acc.rewards.get(i)).append(']');
        }
        return json.append(']').toString();
    }

    /** Whether (ts, id) orders strictly before (otherTs, otherId). */
    static boolean before(long ts, String id, long otherTs, String otherId) {
        return ts != otherTs ? ts < otherTs : TopCounts.compareCodePoints(id, otherId) < 0;
    }
}
