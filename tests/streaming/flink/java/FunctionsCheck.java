// Drives recloop's Flink functions by hand (java's single-file launch, from
// test_flink_functions.py); ids and items are given as their UTF-16 units, uXXXX each.
//   FunctionsCheck top-counts: lines "+ item count ...", "- item count ..." (a slide's counts
//                              added or taken back), "top N" (prints the JSON)
//   FunctionsCheck recent:     lines "+ ts id item reward cap", "list" (prints the JSON)
//   FunctionsCheck parse:      lines of a record's bytes as hex ("-" for none); prints the
//                              event's fields and reason, and the event time, tab-separated
//   FunctionsCheck parse-reused: the same, each record in one array overwritten in place
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import org.apache.flink.types.Row;
import recloop.flink.udf.EventTime;
import recloop.flink.udf.ParseEvent;
import recloop.flink.udf.RecentEvents;
import recloop.flink.udf.TopCounts;

public class FunctionsCheck {
    public static void main(String[] args) throws Exception {
        BufferedReader in =
                new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        PrintStream out = new PrintStream(System.out, true, "UTF-8");
        if (args[0].equals("top-counts")) {
            TopCounts f = new TopCounts();
            TopCounts.Acc acc = f.createAccumulator();
            int top = 0;
            for (String line; (line = in.readLine()) != null; ) {
                String[] p = line.split(" ");
                if (p[0].equals("top")) {
                    top = Integer.parseInt(p[1]);
                    acc.top = top;
                    out.println(f.getValue(acc));
                } else {
                    // One slide's counts: "+|- item count [item count ...]".
                    java.util.Map<String, Integer> counts = new java.util.HashMap<>();
                    for (int i = 1; i + 1 < p.length; i += 2) {
                        counts.put(unescape(p[i]), Integer.parseInt(p[i + 1]));
                    }
                    if (p[0].equals("+")) {
                        f.accumulate(acc, counts, top);
                    } else {
                        f.retract(acc, counts, top);
                    }
                }
            }
        } else if (args[0].equals("parse") || args[0].equals("parse-reused")) {
            // parse-reused: as the job calls them (the time, then the fields) on one array
            // that the caller overwrites in place for each record of the same length — what
            // the parse's one-entry cache must not be fooled by.
            boolean reused = args[0].equals("parse-reused");
            ParseEvent parse = new ParseEvent();
            EventTime time = new EventTime();
            byte[] buffer = null;
            for (String line; (line = in.readLine()) != null; ) {
                byte[] payload = line.equals("-") ? null : hex(line);
                if (reused && payload != null) {
                    if (buffer == null || buffer.length != payload.length) {
                        buffer = new byte[payload.length];
                    }
                    System.arraycopy(payload, 0, buffer, 0, payload.length);
                    payload = buffer;
                    time.eval(payload);
                }
                Row row = parse.eval(payload);
                StringBuilder b = new StringBuilder();
                for (int i = 0; i < row.getArity(); i++) {
                    b.append(row.getField(i)).append('\t');
                }
                out.println(b.append(time.eval(payload)));
            }
        } else {
            RecentEvents f = new RecentEvents();
            RecentEvents.Acc acc = f.createAccumulator();
            for (String line; (line = in.readLine()) != null; ) {
                String[] p = line.split(" ");
                if (p[0].equals("list")) {
                    out.println(f.getValue(acc));
                } else {
                    f.accumulate(acc, Long.parseLong(p[1]), unescape(p[2]), unescape(p[3]),
                            Double.parseDouble(p[4]), Integer.parseInt(p[5]));
                }
            }
        }
    }

    static byte[] hex(String s) {
        byte[] out = new byte[s.length() / 2];
        for (int i = 0; i < out.length; i++) {
            out[i] = (byte) Integer.parseInt(s.substring(2 * i, 2 * i + 2), 16);
        }
        return out;
    }

    static String unescape(String s) {
        StringBuilder out = new StringBuilder();
        for (int i = 0; i < s.length(); i += 5) {
            out.append((char) Integer.parseInt(s.substring(i + 1, i + 5), 16));
        }
        return out.toString();
    }
}
