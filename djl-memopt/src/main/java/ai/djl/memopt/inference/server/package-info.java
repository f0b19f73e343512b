/**
 * An OpenAI-compatible HTTP server (Javalin) for {@link ai.djl.memopt.inference.Generator}:
 * {@link ai.djl.memopt.inference.server.GenerationServer}. One model, one generation worker, a bounded queue;
 * JSON or server-sent-event responses; JSON errors; graceful shutdown.
 */
package ai.djl.memopt.inference.server;
