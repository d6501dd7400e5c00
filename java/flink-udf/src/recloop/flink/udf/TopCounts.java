/*
 * The Top-N of a sliding window's item counts, kept incrementally: recloop's Flink job
 * (recloop.streaming.flink.job) calls it over one row per slide that holds an event, each
 * with the slide's item counts (COLLECT(item_id): a MULTISET<STRING>, item -> count),
 *
 *   recloop_top_counts(counts, top)
 *     OVER (ORDER BY slide_time RANGE BETWEEN <window - slide> PRECEDING AND CURRENT ROW)
 *
 * so each slide adds its counts as it arrives (accumulate) and takes them back as it leaves
 * the window (retract), and each slide's Top-N is one pass over the window's distinct items
 * in one operator — where a HOP window and a window Top-N send a row per (window, item)
 * through the network and rank every window, each event being in window / slide of them
 * (45 for FlinkRL's 60 min / 80 s).  The Redis Streams runner does the same with its
 * per-slide buckets.
 *
 * getValue returns the Top-N as the online store's JSON, [["item", count], ...], ranked by
 * count descending, then item id ascending in code point order (Python's str order and
 * Flink SQL's string order, so ties break as the Redis runner breaks them).
 */
package recloop.flink.udf;

import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.PriorityQueue;
import org.apache.flink.table.annotation.DataTypeHint;
import org.apache.flink.table.annotation.FunctionHint;
import org.apache.flink.table.functions.AggregateFunction;

// The accumulator as a RAW value: Flink keeps the Java object itself in the state and hands it
// to accumulate/getValue as it is.  As a structured type, every row converted the whole
// accumulator (counts) to Flink's internal format and back, which cost more than the work.
@FunctionHint(accumulator = @DataTypeHint(value = "RAW", bridgedTo = TopCounts.Acc.class))
public class TopCounts extends AggregateFunction<String, TopCounts.Acc> {

    /** The window's count per item (items whose count fell to zero are removed). */
    public static class Acc {
        public Map<String, Long> counts = new HashMap<>();
        public int top;
    }

    @Override
    public Acc createAccumulator() {
        return new Acc();
    }

    public void accumulate(
            Acc acc, @DataTypeHint("MULTISET<STRING>") Map<String, Integer> counts, Integer top) {
        if (counts == null || top == null) {
            return;
        }
        acc.top = top;
        for (Map.Entry<String, Integer> e : counts.entrySet()) {
            if (e.getKey() != null && e.getValue() != null) {
                acc.counts.merge(e.getKey(), (long) e.getValue(), Long::sum);
            }
        }
    }

    public void retract(
            Acc acc, @DataTypeHint("MULTISET<STRING>") Map<String, Integer> counts, Integer top) {
        if (counts == null) {
            return;
        }
        for (Map.Entry<String, Integer> e : counts.entrySet()) {
            Long left = e.getKey() == null ? null : acc.counts.get(e.getKey());
            if (left == null || e.getValue() == null) {
                continue;
            }
            if (left - e.getValue() <= 0) {
                acc.counts.remove(e.getKey());
            } else {
                acc.counts.put(e.getKey(), left - e.getValue());
            }
        }
    }

    @Override
    public String getValue(Acc acc) {
        int top = acc.top;
        // A bounded heap whose head is the worst of the best `top` so far: O(items log top).
        PriorityQueue<Map.Entry<String, Long>> best =
                new PriorityQueue<>(Math.max(1, top) + 1, (a, b) -> -ranked(a, b));
        for (Map.Entry<String, Long> e : acc.counts.entrySet()) {
            if (best.size() < top) {
                best.add(e);
            } else if (top > 0 && ranked(e, best.peek()) < 0) {
                best.poll();
                best.add(e);
            }
        }
        List<Map.Entry<String, Long>> out = new ArrayList<>(best);
        out.sort(TopCounts::ranked);
        StringBuilder json = new StringBuilder("[");
        for (int i = 0; i < out.size(); i++) {
            if (i > 0) {
                json.append(',');
            }
            json.append('[');
            quote(json, out.get(i).getKey());
            json.append(',').append(out.get(i).getValue()).append(']');
        }
        return json.append(']').toString();
    }

    /** Count descending, then item id ascending by code point: < 0 if a ranks first. */
    static int ranked(Map.Entry<String, Long> a, Map.Entry<String, Long> b) {
        int byCount = Long.compare(b.getValue(), a.getValue());
        return byCount != 0 ? byCount : compareCodePoints(a.getKey(), b.getKey());
    }

    /** Code point order (String.compareTo compares UTF-16 units, which differs above U+FFFF). */
    static int compareCodePoints(String a, String b) {
        int i = 0;
        int j = 0;
        while (i < a.length() && j < b.length()) {
            int ca = a.codePointAt(i);
            int cb = b.codePointAt(j);
            if (ca != cb) {
                return Integer.compare(ca, cb);
            }
            i += Character.charCount(ca);
            j += Character.charCount(cb);
        }
        return Integer.compare(a.length() - i, b.length() - j);
    }

    /** A JSON string literal (RFC 8259: quote, backslash and control characters escaped). */
    static void quote(StringBuilder json, String s) {
        json.append('"');
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            if (c == '"' || c == '\\') {
                json.append('\\').append(c);
            } else if (c < 0x20) {
                json.append(String.format("\\u%04x", (int) c));
            } else {
                json.append(c);
            }
        }
        json.append('"');
    }
}
