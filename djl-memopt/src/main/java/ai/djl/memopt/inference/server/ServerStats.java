package ai.djl.memopt.inference.server;

/**
 * What a {@link GenerationServer} holds and has done, for monitoring and tests.
 *
 * @param pending requests admitted and not yet answered (tokenizing, queued, running or being written)
 * @param maxPending the most that may be admitted at once ({@code maxQueue + 1})
 * @param pendingBytes estimated memory the admitted requests hold (tokenizing: the tokenizer's working memory; after:
 *     ids, cache for prompt + max_tokens, logits)
 * @param peakPendingBytes the most {@code pendingBytes} has been since the start
 * @param maxPendingBytes the budget {@code pendingBytes} never exceeds
 * @param peakPending the most requests admitted at once since the start
 * @param tokenizedPrompts text prompts tokenized
 * @param refusedUntokenized text prompts refused as too long for the context without being tokenized
 * @param cancelledByDisconnect generations cancelled because their client went away
 * @param openConnections HTTP connections open now
 * @param maxConnections the most that are accepted at once
 */
public record ServerStats(
        int pending,
        int maxPending,
        long pendingBytes,
        long peakPendingBytes,
        long maxPendingBytes,
        int peakPending,
        long tokenizedPrompts,
        long refusedUntokenized,
        long cancelledByDisconnect,
        int openConnections,
        int maxConnections) {}
