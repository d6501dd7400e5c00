/*
 * recloop_event_time(payload BYTES): a valid event's time (seconds), NULL for a record that
 * is not one (Events' rules).  The source table's event-time column: a computed column can
 * call a function of the record but not read another computed column, so the time is
 * parsed here once more (a microsecond in the JVM).
 */
package recloop.flink.udf;

import org.apache.flink.table.functions.ScalarFunction;

public class EventTime extends ScalarFunction {
    public Long eval(byte[] payload) {
        Events e = Events.parse(payload);
        return e.reason == null ? e.ts : null;
    }
}
