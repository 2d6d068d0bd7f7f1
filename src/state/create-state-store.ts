import type { Logger } from "pino";
import type { DaemonConfig } from "../config/daemon-config.js";
import { SyncPolicy } from "../gen/modelmesh/state/v1/state_pb.js";
import { EtcdConnector } from "../storage/etcd-connector.js";
import type { StorageConnector } from "../storage/storage-connector.js";
import { EtcdStateStore } from "./etcd-state-store.js";
import { LocalStateStore } from "./local-state-store.js";
import type { StateStore } from "./state-store.js";

/**
 * Chooses how the daemon keeps its state. With etcd, and a policy that
 * persists, the daemon follows etcd so that several daemons share one
 * state. Otherwise the state lives in this process: under the in-memory
 * policy a daemon shares nothing, whatever its connector.
 */
export function createStateStore(connector: StorageConnector, storage: DaemonConfig["storage"], logger: Logger): StateStore {
  if (connector instanceof EtcdConnector && storage.persistence.syncPolicy !== SyncPolicy.IN_MEMORY) {
    return new EtcdStateStore(
      {
        connector,
        prefix: storage.etcd.prefix,
        endpoints: storage.etcd.endpoints,
        requestTimeoutMs: storage.etcd.requestTimeoutMs,
      },
      logger,
    );
  }
  return new LocalStateStore(connector, logger);
}
