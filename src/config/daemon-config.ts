import { SyncPolicy } from "../gen/modelmesh/state/v1/state_pb.js";
import { ConnectorId } from "../storage/storage-connector.js";

/** The daemon's settings after defaults, file, environment and flags are merged. */
export interface DaemonConfig {
  storage: {
    connector: ConnectorId;
    persistence: {
      /** Default in-memory. */
      syncPolicy: SyncPolicy;
      /** Time between periodic flushes. Default 300 s. */
      syncIntervalMs: number;
    };
    locking: {
      /** Whether clients may take advisory locks. Default true. */
      enabled: boolean;
      /** How long an acquire waits when the request sets no timeout. Default 30 s. */
      timeoutMs: number;
      /** Time between re-checks of a lock queue when no watch event arrives. Default 1 s. */
      retryIntervalMs: number;
      /** Lease time of a lock when the request sets none. Default 15 s. */
      ttlMs: number;
    };
    etcd: {
      /** Client URLs of the etcd cluster. Default ["http://127.0.0.1:2379"]. */
      endpoints: string[];
      /** Key prefix under which all daemon keys live. Default "modelmesh/state". */
      prefix: string;
      /** Time after which an etcd request counts as failed. Default 5 s. */
      requestTimeoutMs: number;
    };
    localFile: {
      /** File of the local-file connector. Default "modelmesh-state.bin" in the working folder. */
      path: string;
    };
  };
  server: {
    /** HOST:PORT to listen on. Default "127.0.0.1:50051". */
    listen: string;
    /** Time that in-flight calls get to finish at shutdown. Default 10 s. */
    shutdownTimeoutMs: number;
    /** Largest request message accepted, in bytes. Default 64 MiB. */
    maxReceiveMessageBytes: number;
    /** Most models, providers and pools that one state may hold in all. Default 100,000. */
    maxStateEntities: number;
    /** Most entity changes in one UpdateState request. Default 10,000. */
    maxUpdateChanges: number;
    /** Time after which a quiet WatchState stream gets a progress message. Default 5 s. */
    watchProgressIntervalMs: number;
  };
  logging: {
    /** pino level: fatal, error, warn, info, debug or trace. Default info. */
    level: string;
  };
}

export const syncPolicyNames: ReadonlyMap<string, SyncPolicy> = new Map([
  ["in-memory", SyncPolicy.IN_MEMORY],
  ["sync-on-boundary", SyncPolicy.SYNC_ON_BOUNDARY],
  ["periodic", SyncPolicy.PERIODIC],
  ["immediate", SyncPolicy.IMMEDIATE],
]);

/** Returns the configuration name of a sync policy, such as "sync-on-boundary". */
export function syncPolicyName(policy: SyncPolicy): string {
  for (const [name, value] of syncPolicyNames) {
    if (value === policy) return name;
  }
  return "unspecified";
}

export const connectorIds: readonly string[] = Object.values(ConnectorId);

export const logLevels: readonly string[] = ["fatal", "error", "warn", "info", "debug", "trace", "silent"];
