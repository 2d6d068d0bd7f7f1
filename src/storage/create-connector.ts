import type { Logger } from "pino";
import type { DaemonConfig } from "../config/daemon-config.js";
import { EtcdConnector } from "./etcd-connector.js";
import { LocalFileConnector } from "./local-file-connector.js";
import { MemoryConnector } from "./memory-connector.js";
import { ConnectorId, type StorageConnector } from "./storage-connector.js";

/** Opens the connector that `storage.connector` names. */
export async function createConnector(storage: DaemonConfig["storage"], logger: Logger): Promise<StorageConnector> {
  switch (storage.connector) {
    case ConnectorId.etcd:
      return await EtcdConnector.open(
        { endpoints: storage.etcd.endpoints, prefix: storage.etcd.prefix, requestTimeoutMs: storage.etcd.requestTimeoutMs },
        logger,
      );
    case ConnectorId.localFile:
      return new LocalFileConnector(storage.localFile.path, logger);
    case ConnectorId.memory:
      return new MemoryConnector();
  }
}

/** Describes where a connector stores state, for the start log line. */
export function describeStorage(storage: DaemonConfig["storage"]): Record<string, unknown> {
  switch (storage.connector) {
    case ConnectorId.etcd:
      return { endpoints: storage.etcd.endpoints, prefix: storage.etcd.prefix };
    case ConnectorId.localFile:
      return { path: storage.localFile.path };
    case ConnectorId.memory:
      return {};
  }
}
