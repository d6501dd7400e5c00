// Drives recloop.flink.udf.TopCounts by hand (java's single-file launch, from
// test_top_counts.py): each stdin line is "+ item count", "- item count" or "top N";
// "top" prints getValue's JSON.  Items are given as their UTF-16 units, uXXXX each.
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import recloop.flink.udf.TopCounts;

public class TopCountsCheck {
    public static void main(String[] args) throws Exception {
        TopCounts f = new TopCounts();
        TopCounts.Acc acc = f.createAccumulator();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        System.setOut(new java.io.PrintStream(System.out, true, "UTF-8"));
        int top = 0;
        for (String line; (line = in.readLine()) != null; ) {
            String[] p = line.split(" ");
            if (p[0].equals("top")) {
                top = Integer.parseInt(p[1]);
                acc.top = top;
                System.out.println(f.getValue(acc));
            } else if (p[0].equals("+")) {
                f.accumulate(acc, unescape(p[1]), Long.parseLong(p[2]), top);
            } else {
                f.retract(acc, unescape(p[1]), Long.parseLong(p[2]), top);
            }
        }
    }

    /** Every UTF-16 unit written as uXXXX (hex), so ids of any characters pass on a line. */
    static String unescape(String s) {
        StringBuilder out = new StringBuilder();
        for (int i = 0; i < s.length(); i += 5) {
            out.append((char) Integer.parseInt(s.substring(i + 1, i + 5), 16));
        }
        return out.toString();
    }
}
