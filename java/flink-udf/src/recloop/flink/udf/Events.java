/*
 * recloop's event rules for the Flink job, applied to a Kafka record's bytes with one JSON
 * parse: the event's fields, or the reason it is not a valid event (the dead-letter reason).
 * The same rules as recloop.streaming.events (the Redis Streams runner's parse_batch) and
 * recloop.data.validity, worded as the Flink job has always worded them; where the Python
 * runner is stricter about ids (it takes strings only), the job also takes numbers.
 */
package recloop.flink.udf;

import java.io.IOException;
import java.util.Arrays;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.DeserializationFeature;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.JsonNode;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.ObjectMapper;

final class Events {
    static final int MAX_ID_LEN = 128;
    static final long MAX_TS = 1L << 53;
    private static final ObjectMapper MAPPER =
            new ObjectMapper().enable(DeserializationFeature.FAIL_ON_TRAILING_TOKENS);

    String eventId;
    String userId;
    String itemId;
    Long ts;
    String behavior;
    Double rating;
    Double reward;
    /** Why the record is not a valid event; null when it is one. */
    String reason;

    private Events() {}

    /** A parse and the bytes it was made from (a copy: the caller may reuse its array). */
    private static final class Parsed {
        final byte[] payload;
        final Events events;

        Parsed(byte[] payload, Events events) {
            this.payload = payload;
            this.events = events;
        }
    }

    /**
     * The last record parsed.  One record is parsed up to three times in a row — for the
     * watermark, for the event-time column and for the fields (a computed column cannot read
     * another) — and comparing its bytes costs a fraction of a parse.  Shared by the threads
     * of a TaskManager: an immutable pair behind a volatile field, so a race costs a parse,
     * never a wrong answer.  Events are never changed after parse() returns.
     */
    private static volatile Parsed last;

    static Events parse(byte[] payload) {
        Parsed cached = last;
        if (cached != null && payload != null && Arrays.equals(cached.payload, payload)) {
            return cached.events;
        }
        Events e = parseFresh(payload);
        if (payload != null) {
            last = new Parsed(payload.clone(), e);
        }
        return e;
    }

    private static Events parseFresh(byte[] payload) {
        Events e = new Events();
        JsonNode doc = null;
        if (payload != null) {
            try {
                doc = MAPPER.readTree(payload);
            } catch (IOException | RuntimeException exc) {
                doc = null;
            }
        }
        if (doc == null || !doc.isObject()) {
            e.reason = "not a JSON object";
            return e;
        }
        e.eventId = id(doc, "event_id", e);
        e.userId = id(doc, "user_id", e);
        e.itemId = id(doc, "item_id", e);
        JsonNode ts = doc.get("ts");
        if (ts != null && ts.isIntegralNumber()) {
            if (!ts.canConvertToLong() || ts.longValue() < 0 || ts.longValue() >= MAX_TS) {
                e.problem("ts: outside [0, 2**53)");
            } else {
                e.ts = ts.longValue();
            }
        } else if (ts != null && ts.isTextual() && isLong(ts.textValue())) {
            long v = Long.parseLong(ts.textValue());
            if (v < 0 || v >= MAX_TS) {
                e.problem("ts: outside [0, 2**53)");
            } else {
                e.ts = v;
            }
        } else {
            e.problem("ts: missing or not an integer");
        }
        JsonNode behavior = doc.get("behavior");
        if (behavior != null && !behavior.isNull()) {
            String b = behavior.isTextual() ? behavior.textValue() : null;
            if (b != null && (b.equals("pv") || b.equals("cart") || b.equals("fav") || b.equals("buy"))) {
                e.behavior = b;
            } else {
                e.problem("behavior: not one of pv, cart, fav, buy");
            }
        }
        e.rating = number(doc, "rating", e);
        e.reward = number(doc, "reward", e);
        return e;
    }

    private void problem(String why) {
        if (reason == null) {
            reason = why;
        }
    }

    private static String id(JsonNode doc, String name, Events e) {
        JsonNode v = doc.get(name);
        String text = v != null && (v.isTextual() || v.isNumber()) ? v.asText() : null;
        if (text == null || text.isEmpty() || text.codePointCount(0, text.length()) > MAX_ID_LEN) {
            e.problem(name + ": missing, not a string or number, empty or over "
                    + MAX_ID_LEN + " characters");
            return null;
        }
        return text;
    }

    private static Double number(JsonNode doc, String name, Events e) {
        JsonNode v = doc.get(name);
        if (v == null || v.isNull()) {
            return null;
        }
        if (!v.isNumber()) {
            e.problem(name + ": not a number");
            return null;
        }
        return v.doubleValue();
    }

    private static boolean isLong(String s) {
        try {
            Long.parseLong(s);
            return true;
        } catch (NumberFormatException exc) {
            return false;
        }
    }
}
