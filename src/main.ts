#!/usr/bin/env node
import { readFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { buildConfig, ConfigError, environmentOverrides, loadConfigFile } from "./config/load-config.js";
import { parseDurationMs } from "./config/duration.js";
import type { DaemonConfig } from "./config/daemon-config.js";
import { startDaemon } from "./daemon.js";
import { checkHealth } from "./health-check.js";
import { createLogger, routeGrpcLogs } from "./logging.js";

const usage = `Usage:
  modelmesh-state-daemon [--config FILE] [--listen HOST:PORT]
      Runs the daemon. Without --config it uses config/default.yaml: the
      local-file connector in the working folder, listening on 127.0.0.1:50051.
  modelmesh-state-daemon health-check [--address HOST:PORT] [--service NAME] [--timeout DURATION]
      Exits 0 when the daemon's grpc.health.v1 service reports SERVING, else 1.

Environment variables override configuration keys:
${environmentOverrides.map(({ env, key }) => `  ${env.padEnd(30)} ${key}`).join("\n")}
`;

const defaultConfigPath = fileURLToPath(new URL("../config/default.yaml", import.meta.url));

async function main(argv: string[]): Promise<number> {
  if (argv[0] === "health-check") return await runHealthCheck(argv.slice(1));
  const { values } = parseArgs({
    args: argv,
    options: {
      config: { type: "string" },
      listen: { type: "string" },
      help: { type: "boolean", short: "h" },
    },
    strict: true,
  });
  if (values.help === true) {
    process.stdout.write(usage);
    return 0;
  }
  const config = await readConfig(values.config, values.listen);
  return await runDaemon(config);
}

async function readConfig(configPath: string | undefined, listen: string | undefined): Promise<DaemonConfig> {
  if (configPath !== undefined) return await loadConfigFile(configPath, process.env, listen);
  const yamlText = await readFile(defaultConfigPath, "utf8");
  return buildConfig({
    yamlText,
    fileName: defaultConfigPath,
    environment: process.env,
    ...(listen === undefined ? {} : { listen }),
  });
}

async function runDaemon(config: DaemonConfig): Promise<number> {
  const logger = createLogger(config.logging.level);
  routeGrpcLogs(logger);
  process.on("unhandledRejection", (reason) => {
    // A rejection that no code awaited is a bug in the daemon. Logging it, instead of exiting, keeps clients served.
    logger.error({ err: reason }, "unhandled promise rejection");
  });

  const daemon = await startDaemon(config, logger);
  const signal = await new Promise<NodeJS.Signals>((resolve) => {
    process.once("SIGTERM", () => resolve("SIGTERM"));
    process.once("SIGINT", () => resolve("SIGINT"));
  });
  // A second signal during shutdown stops at once, as operators expect of Ctrl-C twice.
  const forceExit = (): never => process.exit(130);
  process.once("SIGTERM", forceExit);
  process.once("SIGINT", forceExit);
  return await daemon.shutdown(signal);
}

async function runHealthCheck(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      address: { type: "string", default: "127.0.0.1:50051" },
      service: { type: "string", default: "" },
      timeout: { type: "string", default: "3s" },
    },
    strict: true,
  });
  const timeoutMs = parseDurationMs(values.timeout);
  if (timeoutMs === undefined) throw new ConfigError(`invalid --timeout ${values.timeout}: expected a duration such as "3s"`);
  try {
    const status = await checkHealth(values.address, values.service, timeoutMs);
    process.stdout.write(`${status}\n`);
    return status === "SERVING" ? 0 : 1;
  } catch (error) {
    process.stderr.write(`health check of ${values.address} failed: ${(error as Error).message}\n`);
    return 1;
  }
}

main(process.argv.slice(2)).then(
  (exitCode) => process.exit(exitCode),
  (error: unknown) => {
    const known = error instanceof ConfigError || (error as { code?: string }).code === "ERR_PARSE_ARGS_UNKNOWN_OPTION";
    process.stderr.write(known ? `modelmesh-state-daemon: ${(error as Error).message}\n` : `modelmesh-state-daemon: cannot start: ${String((error as Error).stack ?? error)}\n`);
    process.exit(2);
  },
);
