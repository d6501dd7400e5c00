/*
 * recloop_parse_event(payload BYTES): a Kafka record's event fields and, when it is not a
 * valid event, the reason (Events: one JSON parse).  The Flink job reads the topic once, as
 * bytes, and every branch takes its rows from this: the valid events (reason NULL) for the
 * log, popular and recent items, the others for the dead-letter topic — so a record is
 * either an event or a dead letter, never both and never neither.
 */
package recloop.flink.udf;

import org.apache.flink.table.annotation.DataTypeHint;
import org.apache.flink.table.functions.ScalarFunction;
import org.apache.flink.types.Row;

public class ParseEvent extends ScalarFunction {
    @DataTypeHint(
            "ROW<event_id STRING, user_id STRING, item_id STRING, ts BIGINT, behavior STRING, "
                    + "rating DOUBLE, reward DOUBLE, reason STRING>")
    public Row eval(byte[] payload) {
        Events e = Events.parse(payload);
        return Row.of(e.eventId, e.userId, e.itemId, e.ts, e.behavior, e.rating, e.reward, e.reason);
    }
}
