// Runs GGUF files through the llama.cpp that node-llama-cpp 3.21.1 bundles (its prebuilt linux-x64 CPU binaries),
// for djl-memopt's tests and benchmarks. One JSON request on stdin, one JSON line on stdout:
//   {"jobs": [{"model": "x.gguf", "contextSize": 256, "threads": 1,
//              "greedy": {"prompt": [ids], "newTokens": 16},         -> "greedy": [new ids]
//              "logprobs": [[ids], ...],                              -> "logprobs": [[log p(ids[i+1] | ids[..i])], ...]
//              "bench": {"prompt": [ids], "newTokens": 128}}]}       -> "bench": {promptSeconds, decodeSeconds, ...}
//   or {"model": "x.gguf", "vocabOnly": true, "tokenize": ["text", ...]} -> "tokens": [[ids], ...] (no special tokens)
// Log-probabilities are the log of llama.cpp's softmax over the full vocabulary (greedy sampler, no truncation).
import {getLlama, LlamaLogLevel} from "node-llama-cpp";
import fs from "node:fs";

const request = JSON.parse(fs.readFileSync(0, "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const results = [];
for (const job of request.jobs) {
    const model = await llama.loadModel({modelPath: job.model, vocabOnly: job.vocabOnly === true});
    if (job.vocabOnly) {
        results.push({model: job.model, tokens: (job.tokenize ?? []).map(t => Array.from(model.tokenize(t, false)))});
        await model.dispose();
        continue;
    }
    const contextSize = job.contextSize ?? 256;
    const context = await model.createContext({
        contextSize, batchSize: Math.min(contextSize, 512), threads: job.threads ?? 1});
    const seq = context.getSequence();
    const out = {model: job.model, llamaCppRelease: "node-llama-cpp 3.21.1"};
    if (job.greedy) {
        const tokens = [];
        if (job.greedy.newTokens > 0) {
            for await (const t of seq.evaluate(job.greedy.prompt, {temperature: 0})) {
                tokens.push(t);
                if (tokens.length >= job.greedy.newTokens) break;
            }
        }
        out.greedy = tokens;
        await seq.clearHistory();
    }
    if (job.logprobs) {
        out.logprobs = [];
        for (const ids of job.logprobs) {
            const input = ids.map((t, i) => i < ids.length - 1 ? [t, {generateNext: {probabilities: true}}] : t);
            const res = await seq.controlledEvaluate(input);
            out.logprobs.push(ids.slice(1).map((next, i) => Math.log(res[i].next.probabilities.get(next) ?? 0)));
            await seq.clearHistory();
        }
    }
    if (job.bench) {
        // prompt processing, then greedy decoding of newTokens one at a time (batch 1), timed separately
        const prompt = job.bench.prompt;
        let t0 = process.hrtime.bigint();
        const first = await seq.controlledEvaluate(prompt.map((t, i) => i < prompt.length - 1 ? t
            : [t, {generateNext: {token: true}}]));
        let next = first[prompt.length - 1].next.token;
        const t1 = process.hrtime.bigint();
        const generated = [next];
        while (generated.length < job.bench.newTokens) {
            const r = await seq.controlledEvaluate([[next, {generateNext: {token: true}}]]);
            next = r[0].next.token;
            generated.push(next);
        }
        const t2 = process.hrtime.bigint();
        out.bench = {promptTokens: prompt.length, newTokens: generated.length,
            promptSeconds: Number(t1 - t0) / 1e9, decodeSeconds: Number(t2 - t1) / 1e9, tokens: generated};
        await seq.clearHistory();
    }
    results.push(out);
    await context.dispose();
    await model.dispose();
}
console.log(JSON.stringify({results}));
await llama.dispose();
