import { randomBytes } from "node:crypto";
import { pino } from "pino";
import { buildConfig } from "../../src/config/load-config.js";
import { startDaemon, type RunningDaemon } from "../../src/daemon.js";
import { StateClient } from "./state-client.js";

export interface InProcessDaemon {
  daemon: RunningDaemon;
  client: StateClient;
  /** Closes the client and shuts the daemon down; resolves with its exit code. */
  stop(): Promise<number>;
}

/**
 * Starts a daemon inside the test process from YAML configuration text, on
 * 127.0.0.1 port 0. Set TEST_LOG_LEVEL=debug to see its log.
 */
export async function startInProcessDaemon(configYaml: string): Promise<InProcessDaemon> {
  const config = buildConfig({ yamlText: configYaml, fileName: "test configuration", listen: "127.0.0.1:0" });
  const logger = pino({ level: process.env["TEST_LOG_LEVEL"] ?? "silent" });
  const daemon = await startDaemon(config, logger);
  await daemon.ready;
  const client = new StateClient(daemon.address);
  return {
    daemon,
    client,
    stop: async () => {
      client.close();
      return await daemon.shutdown("test finished");
    },
  };
}

/** Returns an etcd key prefix no other test uses. */
export function uniquePrefix(label: string): string {
  return `test/${label}/${randomBytes(6).toString("hex")}`;
}

export interface EtcdConfigOptions {
  /** Key prefix; default a fresh one from `uniquePrefix`. */
  prefix?: string;
  /** storage.persistence.sync_interval, such as "1h". */
  syncInterval?: string;
  /** Lines added inside the "storage:" section, indented by two spaces, such as "  locking: { ttl: 2s }". */
  storageLines?: string[];
  /** YAML appended at the top level, such as a "server:" section. */
  extraYaml?: string;
}

/** YAML configuration for the etcd connector under a fresh prefix. */
export function etcdConfigYaml(endpoint: string, policy: string, options: EtcdConfigOptions = {}): string {
  return [
    "storage:",
    "  connector: modelmesh.etcd.v1",
    "  persistence:",
    `    sync_policy: ${policy}`,
    ...(options.syncInterval === undefined ? [] : [`    sync_interval: ${options.syncInterval}`]),
    "  etcd:",
    `    endpoints: [${JSON.stringify(endpoint)}]`,
    `    prefix: ${options.prefix ?? uniquePrefix(policy)}`,
    ...(options.storageLines ?? []),
    options.extraYaml ?? "",
  ].join("\n");
}

/** Polls `probe` every 50 ms until it returns true or `timeoutMs` passes. */
export async function waitFor(probe: () => boolean | Promise<boolean>, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await probe()) return;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
}
