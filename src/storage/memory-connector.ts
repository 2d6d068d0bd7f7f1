import { fromBinary, toBinary } from "@bufbuild/protobuf";
import { SystemStateSchema, type SystemState } from "../gen/modelmesh/state/v1/state_pb.js";
import { assertFenceCurrent } from "./assert-fence-current.js";
import { ConnectorId, type SaveOptions, type StorageConnector } from "./storage-connector.js";

/**
 * Keeps the last saved snapshot in this process's memory. It outlives no
 * restart: it suits development and single-process tests of routers. The
 * snapshot is kept encoded, so later changes to a saved object never reach it.
 */
export class MemoryConnector implements StorageConnector {
  readonly id = ConnectorId.memory;
  private snapshot: Uint8Array | undefined;

  async load(): Promise<SystemState | undefined> {
    return this.snapshot === undefined ? undefined : fromBinary(SystemStateSchema, this.snapshot);
  }

  async save(state: SystemState, options: SaveOptions = {}): Promise<void> {
    const bytes = toBinary(SystemStateSchema, state);
    assertFenceCurrent(options.fence);
    this.snapshot = bytes;
  }

  async isReachable(): Promise<boolean> {
    return true;
  }

  async close(): Promise<void> {
    this.snapshot = undefined;
  }
}
