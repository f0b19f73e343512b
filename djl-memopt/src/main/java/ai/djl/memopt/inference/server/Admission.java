package ai.djl.memopt.inference.server;

import com.google.common.base.Preconditions;

/**
 * What the server has taken on: at most {@code maxRequests} requests (running, queued or being tokenized) holding at
 * most {@code maxBytes} of estimated memory together. A request is admitted, or refused at once (429 while others hold
 * the room, 413 if it needs more than the whole budget); it never waits. An admitted request holds a {@link Ticket}
 * whose bytes follow its phases: the tokenizer's working memory while its text is tokenized, then what its generation
 * holds (prompt and output ids, cache, logits), until its response is written.
 */
final class Admission {

    private final int maxRequests;
    private final long maxBytes;
    private int requests;
    private long bytes;
    private int peakRequests;
    private long peakBytes;

    Admission(int maxRequests, long maxBytes) {
        Preconditions.checkArgument(maxRequests >= 1, "maxRequests must be >= 1, got %s", maxRequests);
        Preconditions.checkArgument(maxBytes >= 1, "maxBytes must be >= 1, got %s", maxBytes);
        this.maxRequests = maxRequests;
        this.maxBytes = maxBytes;
    }

    /**
     * Admits a request needing {@code need} bytes.
     *
     * @param what what the bytes are for, for messages
     * @throws ApiException 413 if {@code need} exceeds the whole budget, 429 if the room is taken
     */
    synchronized Ticket admit(long need, String what) {
        checkFitsAtAll(need, what);
        if (requests >= maxRequests) {
            throw ApiException.busy("the server is busy: " + requests + " requests are admitted (running, queued or being"
                    + " tokenized), the most it takes");
        }
        reserve(need, 0, what);
        requests++;
        peakRequests = Math.max(peakRequests, requests);
        return new Ticket(need);
    }

    private void checkFitsAtAll(long need, String what) {
        if (need > maxBytes) {
            throw ApiException.tooLarge(null, "the request needs an estimated " + need + " bytes (" + what + "), more than"
                    + " this server admits in total (" + maxBytes + " bytes)");
        }
    }

    private void reserve(long need, long held, String what) {
        if (bytes - held + need > maxBytes) {
            throw ApiException.busy("the server is busy: admitted requests hold an estimated " + bytes + " of " + maxBytes
                    + " bytes and this one needs " + need + " (" + what + ")");
        }
        bytes += need - held;
        peakBytes = Math.max(peakBytes, bytes);
    }

    /** What is held now, and the most that has been. */
    record Usage(int requests, long bytes, int peakRequests, long peakBytes) {}

    synchronized Usage usage() {
        return new Usage(requests, bytes, peakRequests, peakBytes);
    }

    long maxBytes() {
        return maxBytes;
    }

    int maxRequests() {
        return maxRequests;
    }

    /** One admitted request's hold; {@link #close()} gives it back. */
    final class Ticket implements AutoCloseable {
        private long held;
        private boolean closed;

        private Ticket(long held) {
            this.held = held;
        }

        /**
         * Changes what this request holds (smaller always fits; larger may not).
         *
         * @throws ApiException 413 or 429 as {@link #admit}; the ticket keeps what it held
         */
        void resize(long need, String what) {
            synchronized (Admission.this) {
                Preconditions.checkState(!closed, "ticket closed");
                checkFitsAtAll(need, what);
                reserve(need, held, what);
                held = need;
            }
        }

        long held() {
            synchronized (Admission.this) {
                return held;
            }
        }

        @Override
        public void close() {
            synchronized (Admission.this) {
                if (!closed) {
                    closed = true;
                    bytes -= held;
                    requests--;
                }
            }
        }
    }
}
