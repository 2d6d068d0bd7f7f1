import type { Logger } from "pino";
import type { DaemonConfig } from "../config/daemon-config.js";
import { EtcdConnector } from "../storage/etcd-connector.js";
import type { StorageConnector } from "../storage/storage-connector.js";
import { EtcdLockService } from "./etcd-lock-service.js";
import type { LockService } from "./lock-service.js";
import { LocalLockService } from "./local-lock-service.js";

/**
 * Creates the lock service that matches the connector: locks in etcd, shared
 * by every daemon on the cluster, for the etcd connector, and locks inside
 * this process for the local-file and memory connectors.
 */
export async function createLockService(
  connector: StorageConnector,
  storage: DaemonConfig["storage"],
  logger: Logger,
): Promise<LockService> {
  if (connector instanceof EtcdConnector) {
    return await EtcdLockService.open(
      {
        client: connector.etcdClient,
        endpoints: storage.etcd.endpoints,
        prefix: storage.etcd.prefix,
        requestTimeoutMs: storage.etcd.requestTimeoutMs,
        retryIntervalMs: storage.locking.retryIntervalMs,
      },
      logger,
    );
  }
  return new LocalLockService(logger);
}
