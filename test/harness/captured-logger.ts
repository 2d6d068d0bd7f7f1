import { Writable } from "node:stream";
import { pino, type Logger } from "pino";

/** A pino logger whose JSON lines are kept, so tests can check what was logged. */
export interface CapturedLogger {
  logger: Logger;
  lines: Array<Record<string, unknown>>;
}

/** Creates a logger at `level` that keeps each line it writes, parsed. */
export function captureLogger(level = "info"): CapturedLogger {
  const lines: Array<Record<string, unknown>> = [];
  const stream = new Writable({
    write(chunk: Buffer, _encoding, done) {
      lines.push(JSON.parse(chunk.toString("utf8")) as Record<string, unknown>);
      done();
    },
  });
  return { logger: pino({ level }, stream), lines };
}
