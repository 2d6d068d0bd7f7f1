import { format } from "node:util";
import * as grpc from "@grpc/grpc-js";
import { pino, type Logger } from "pino";

/** Creates the daemon's root logger: one JSON line per event on stdout. */
export function createLogger(level: string): Logger {
  return pino({
    level,
    base: { service: "modelmesh-state-daemon", pid: process.pid },
    timestamp: pino.stdTimeFunctions.isoTime,
    // int64 fields of protobuf-es messages are bigint, which JSON.stringify rejects.
    hooks: {
      logMethod(args, method) {
        method.apply(this, args.map(bigintToString) as Parameters<typeof method>);
      },
    },
  });
}

function bigintToString(value: unknown): unknown {
  if (typeof value === "bigint") return value.toString();
  if (value === null || typeof value !== "object" || Array.isArray(value) || value instanceof Error) return value;
  const entries = Object.entries(value as Record<string, unknown>);
  if (!entries.some(([, field]) => typeof field === "bigint")) return value;
  return Object.fromEntries(entries.map(([key, field]) => [key, typeof field === "bigint" ? field.toString() : field]));
}

/**
 * Sends grpc-js's own log lines through pino instead of stderr, at ERROR
 * verbosity, or DEBUG when the daemon logs at debug or trace. GRPC_TRACE
 * still selects grpc-js's tracers.
 */
export function routeGrpcLogs(logger: Logger): void {
  const grpcLogger = logger.child({ component: "grpc-js" });
  grpc.setLogger({
    error: (message?: unknown, ...rest: unknown[]) => grpcLogger.error(format(message, ...rest)),
    info: (message?: unknown, ...rest: unknown[]) => grpcLogger.info(format(message, ...rest)),
    debug: (message?: unknown, ...rest: unknown[]) => grpcLogger.debug(format(message, ...rest)),
  });
  const verbose = logger.isLevelEnabled("debug");
  grpc.setLogVerbosity(verbose ? grpc.logVerbosity.DEBUG : grpc.logVerbosity.ERROR);
}
