import { readFile } from "node:fs/promises";
import { parse as parseYaml } from "yaml";
import { SyncPolicy } from "../gen/modelmesh/state/v1/state_pb.js";
import { ConnectorId } from "../storage/storage-connector.js";
import { connectorIds, logLevels, syncPolicyNames, type DaemonConfig } from "./daemon-config.js";
import { parseDurationMs } from "./duration.js";

/** A configuration that cannot be used; the message names the key and the fix. */
export class ConfigError extends Error {
  override readonly name = "ConfigError";
}

/** Returns the configuration used when no file and no override sets a key. */
export function defaultConfig(): DaemonConfig {
  return {
    storage: {
      connector: ConnectorId.localFile,
      persistence: { syncPolicy: SyncPolicy.IN_MEMORY, syncIntervalMs: 300_000 },
      locking: { enabled: true, timeoutMs: 30_000, retryIntervalMs: 1_000, ttlMs: 15_000 },
      etcd: { endpoints: ["http://127.0.0.1:2379"], prefix: "modelmesh/state", requestTimeoutMs: 5_000 },
      localFile: { path: "modelmesh-state.bin" },
    },
    server: {
      listen: "127.0.0.1:50051",
      shutdownTimeoutMs: 10_000,
      maxReceiveMessageBytes: 64 * 1024 * 1024,
      maxStateEntities: 100_000,
      maxUpdateChanges: 10_000,
      watchProgressIntervalMs: 5_000,
    },
    logging: { level: "info" },
  };
}

interface Setting {
  /** Dotted YAML key, such as "storage.persistence.sync_interval". */
  key: string;
  /** Environment variable that overrides the key, if any. */
  env?: string;
  /** Converts a YAML value (or an environment string) and stores it; throws a message on bad input. */
  apply(config: DaemonConfig, value: unknown, fromEnvironment: boolean): void;
}

const settings: readonly Setting[] = [
  {
    key: "storage.connector",
    env: "MODELMESH_STORAGE_CONNECTOR",
    apply: (config, value) => {
      config.storage.connector = readChoice(value, connectorIds) as ConnectorId;
    },
  },
  {
    key: "storage.persistence.sync_policy",
    env: "MODELMESH_SYNC_POLICY",
    apply: (config, value) => {
      const name = readChoice(value, [...syncPolicyNames.keys()]);
      config.storage.persistence.syncPolicy = syncPolicyNames.get(name) ?? SyncPolicy.IN_MEMORY;
    },
  },
  {
    key: "storage.persistence.sync_interval",
    env: "MODELMESH_SYNC_INTERVAL",
    apply: (config, value) => {
      config.storage.persistence.syncIntervalMs = readPositiveDuration(value);
    },
  },
  {
    key: "storage.locking.enabled",
    env: "MODELMESH_LOCKING_ENABLED",
    apply: (config, value, fromEnvironment) => {
      config.storage.locking.enabled = readBoolean(value, fromEnvironment);
    },
  },
  {
    key: "storage.locking.timeout",
    apply: (config, value) => {
      config.storage.locking.timeoutMs = readPositiveDuration(value);
    },
  },
  {
    key: "storage.locking.retry_interval",
    apply: (config, value) => {
      config.storage.locking.retryIntervalMs = readPositiveDuration(value);
    },
  },
  {
    key: "storage.locking.ttl",
    apply: (config, value) => {
      config.storage.locking.ttlMs = readPositiveDuration(value);
    },
  },
  {
    key: "storage.etcd.endpoints",
    env: "MODELMESH_ETCD_ENDPOINTS",
    apply: (config, value, fromEnvironment) => {
      config.storage.etcd.endpoints = readEndpoints(value, fromEnvironment);
    },
  },
  {
    key: "storage.etcd.prefix",
    env: "MODELMESH_ETCD_PREFIX",
    apply: (config, value) => {
      config.storage.etcd.prefix = readEtcdPrefix(value);
    },
  },
  {
    key: "storage.etcd.request_timeout",
    apply: (config, value) => {
      config.storage.etcd.requestTimeoutMs = readPositiveDuration(value);
    },
  },
  {
    key: "storage.local_file.path",
    env: "MODELMESH_LOCAL_FILE_PATH",
    apply: (config, value) => {
      config.storage.localFile.path = readNonEmptyString(value);
    },
  },
  {
    key: "server.listen",
    env: "MODELMESH_LISTEN",
    apply: (config, value) => {
      config.server.listen = readListenAddress(value);
    },
  },
  {
    key: "server.shutdown_timeout",
    apply: (config, value) => {
      config.server.shutdownTimeoutMs = readPositiveDuration(value);
    },
  },
  {
    key: "server.max_receive_message_bytes",
    apply: (config, value) => {
      config.server.maxReceiveMessageBytes = readPositiveInteger(value);
    },
  },
  {
    key: "server.max_state_entities",
    apply: (config, value) => {
      config.server.maxStateEntities = readPositiveInteger(value);
    },
  },
  {
    key: "server.max_update_changes",
    apply: (config, value) => {
      config.server.maxUpdateChanges = readPositiveInteger(value);
    },
  },
  {
    key: "server.watch_progress_interval",
    apply: (config, value) => {
      config.server.watchProgressIntervalMs = readPositiveDuration(value);
    },
  },
  {
    key: "logging.level",
    env: "MODELMESH_LOG_LEVEL",
    apply: (config, value) => {
      config.logging.level = readChoice(value, logLevels);
    },
  },
];

/** Environment variables that override configuration keys, for the README and `--help`. */
export const environmentOverrides: ReadonlyArray<{ env: string; key: string }> = settings.flatMap((setting) =>
  setting.env === undefined ? [] : [{ env: setting.env, key: setting.key }],
);

export interface ConfigSources {
  /** YAML text of the configuration file, or undefined to use the defaults alone. */
  yamlText?: string;
  /** Name of the file that `yamlText` came from, for messages. */
  fileName?: string;
  environment?: NodeJS.ProcessEnv;
  /** Value of the `--listen` flag, which overrides file and environment. */
  listen?: string;
}

/** Merges defaults, the YAML file, environment overrides and flags, in that order. */
export function buildConfig(sources: ConfigSources): DaemonConfig {
  const config = defaultConfig();
  if (sources.yamlText !== undefined) {
    applyYaml(config, sources.yamlText, sources.fileName ?? "configuration");
  }
  for (const setting of settings) {
    const text = setting.env === undefined ? undefined : sources.environment?.[setting.env];
    if (text === undefined || text === "") continue;
    applySetting(setting, config, text, true, `environment variable ${setting.env} (${setting.key})`);
  }
  if (sources.listen !== undefined) {
    applySetting(settingFor("server.listen"), config, sources.listen, true, "--listen");
  }
  return config;
}

/** Reads `fileName` and builds the configuration from it, the environment and flags. */
export async function loadConfigFile(
  fileName: string,
  environment: NodeJS.ProcessEnv,
  listen?: string,
): Promise<DaemonConfig> {
  let yamlText: string;
  try {
    yamlText = await readFile(fileName, "utf8");
  } catch (error) {
    throw new ConfigError(`cannot read configuration file ${fileName}: ${(error as Error).message}`);
  }
  return buildConfig({ yamlText, fileName, environment, ...(listen === undefined ? {} : { listen }) });
}

function applyYaml(config: DaemonConfig, yamlText: string, fileName: string): void {
  let document: unknown;
  try {
    document = parseYaml(yamlText);
  } catch (error) {
    throw new ConfigError(`cannot parse ${fileName} as YAML: ${(error as Error).message}`);
  }
  if (document === null || document === undefined) return;
  if (!isPlainObject(document)) {
    throw new ConfigError(`invalid ${fileName}: the top level must be a mapping of keys such as "storage" and "server"`);
  }
  applyMapping(config, document, "", fileName);
}

function applyMapping(config: DaemonConfig, mapping: Record<string, unknown>, parentKey: string, fileName: string): void {
  for (const [name, value] of Object.entries(mapping)) {
    const key = parentKey === "" ? name : `${parentKey}.${name}`;
    const setting = settings.find((candidate) => candidate.key === key);
    if (setting !== undefined) {
      applySetting(setting, config, value, false, `${key} in ${fileName}`);
      continue;
    }
    const isSection = settings.some((candidate) => candidate.key.startsWith(`${key}.`));
    if (!isSection) {
      throw new ConfigError(`unknown configuration key ${key} in ${fileName}; known keys: ${knownKeysNear(key)}`);
    }
    if (!isPlainObject(value)) {
      throw new ConfigError(`invalid ${key} in ${fileName}: expected a mapping of keys, got ${describe(value)}`);
    }
    applyMapping(config, value, key, fileName);
  }
}

function applySetting(setting: Setting, config: DaemonConfig, value: unknown, fromEnvironment: boolean, where: string): void {
  try {
    setting.apply(config, value, fromEnvironment);
  } catch (error) {
    throw new ConfigError(`invalid ${where}: ${(error as Error).message}`);
  }
}

function settingFor(key: string): Setting {
  const setting = settings.find((candidate) => candidate.key === key);
  if (setting === undefined) throw new Error(`no configuration setting is named ${key}`);
  return setting;
}

function knownKeysNear(key: string): string {
  const parent = key.includes(".") ? key.slice(0, key.lastIndexOf(".") + 1) : "";
  const siblings = settings.map((setting) => setting.key).filter((candidate) => candidate.startsWith(parent));
  return (siblings.length > 0 ? siblings : settings.map((setting) => setting.key)).join(", ");
}

function readChoice(value: unknown, choices: readonly string[]): string {
  if (typeof value !== "string" || !choices.includes(value)) {
    throw new Error(`expected one of ${choices.join(", ")}, got ${describe(value)}`);
  }
  return value;
}

function readPositiveDuration(value: unknown): number {
  const durationMs = typeof value === "string" ? parseDurationMs(value) : undefined;
  if (durationMs === undefined || durationMs <= 0) {
    throw new Error(`expected a positive duration such as "300s", "500ms" or "5m", got ${describe(value)}`);
  }
  return durationMs;
}

function readBoolean(value: unknown, fromEnvironment: boolean): boolean {
  if (typeof value === "boolean") return value;
  if (fromEnvironment && (value === "true" || value === "false")) return value === "true";
  throw new Error(`expected true or false, got ${describe(value)}`);
}

function readPositiveInteger(value: unknown): number {
  if (typeof value !== "number" || !Number.isSafeInteger(value) || value <= 0) {
    throw new Error(`expected a positive integer, got ${describe(value)}`);
  }
  return value;
}

function readNonEmptyString(value: unknown): string {
  if (typeof value !== "string" || value.trim() === "") {
    throw new Error(`expected a non-empty string, got ${describe(value)}`);
  }
  return value;
}

function readEndpoints(value: unknown, fromEnvironment: boolean): string[] {
  const list = fromEnvironment && typeof value === "string" ? value.split(",").map((item) => item.trim()) : value;
  if (!Array.isArray(list) || list.length === 0) {
    throw new Error(`expected a non-empty list of URLs such as ["http://127.0.0.1:2379"], got ${describe(value)}`);
  }
  return list.map((item) => {
    if (typeof item !== "string" || !/^https?:\/\/[^/\s]+\/?$/.test(item)) {
      throw new Error(`expected each endpoint to be a URL such as "http://127.0.0.1:2379", got ${describe(item)}`);
    }
    return item;
  });
}

function readEtcdPrefix(value: unknown): string {
  const prefix = readNonEmptyString(value);
  if (prefix.endsWith("/")) {
    throw new Error(`expected a prefix without a trailing "/", got ${describe(value)}`);
  }
  return prefix;
}

function readListenAddress(value: unknown): string {
  const address = readNonEmptyString(value);
  const match = /^(\[[0-9a-fA-F:.]+\]|[^:\s]+):(\d{1,5})$/.exec(address);
  const port = match === null ? Number.NaN : Number(match[2]);
  if (!(port >= 0 && port <= 65535)) {
    throw new Error(`expected HOST:PORT such as "127.0.0.1:50051" or "[::1]:0", got ${describe(value)}`);
  }
  return address;
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function describe(value: unknown): string {
  if (value === undefined || value === null) return "nothing";
  if (typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) return `a list (${JSON.stringify(value)})`;
  if (typeof value === "object") return "a mapping";
  return `${typeof value} ${String(value)}`;
}
