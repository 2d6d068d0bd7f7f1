import { randomBytes } from "node:crypto";
import { access, constants, open, readFile, rename, rm } from "node:fs/promises";
import { dirname, resolve } from "node:path";
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import type { Logger } from "pino";
import { SystemStateSchema, type SystemState } from "../gen/modelmesh/state/v1/state_pb.js";
import { isServiceError, unavailable } from "../server/service-error.js";
import { assertFenceCurrent } from "./assert-fence-current.js";
import { ConnectorId, type SaveOptions, type StorageConnector } from "./storage-connector.js";

/**
 * Stores the snapshot as one protobuf-encoded SystemState file. A save writes
 * a temporary file beside it, fsyncs it, renames it over the old one and
 * fsyncs the folder, so a crash leaves either the old file or the new one.
 */
export class LocalFileConnector implements StorageConnector {
  readonly id = ConnectorId.localFile;
  readonly path: string;
  private readonly logger: Logger;

  constructor(path: string, logger: Logger) {
    this.path = resolve(path);
    this.logger = logger.child({ connector: this.id, path: this.path });
  }

  async load(): Promise<SystemState | undefined> {
    let bytes: Buffer;
    try {
      bytes = await readFile(this.path);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw unavailable(`cannot read state file ${this.path}: ${(error as Error).message}`, error);
    }
    try {
      return fromBinary(SystemStateSchema, bytes);
    } catch (error) {
      // A damaged file is not treated as empty: starting empty would overwrite it at the next save.
      throw unavailable(
        `cannot decode state file ${this.path} (${bytes.length} bytes): ${(error as Error).message}; ` +
          `move it away to start with an empty state`,
        error,
      );
    }
  }

  async save(state: SystemState, options: SaveOptions = {}): Promise<void> {
    const bytes = toBinary(SystemStateSchema, state);
    const temporaryPath = `${this.path}.tmp-${process.pid}-${randomBytes(4).toString("hex")}`;
    try {
      await writeAndSync(temporaryPath, bytes);
      // The rename is the commit. NOTE: a grant that expires while the rename runs is not noticed.
      assertFenceCurrent(options.fence);
      await rename(temporaryPath, this.path);
      await syncFolder(dirname(this.path));
    } catch (error) {
      await rm(temporaryPath, { force: true }).catch(() => undefined);
      if (isServiceError(error)) throw error;
      throw unavailable(`cannot write state file ${this.path}: ${(error as Error).message}`, error);
    }
    this.logger.debug({ bytes: bytes.length }, "state file written");
  }

  async isReachable(): Promise<boolean> {
    try {
      await access(dirname(this.path), constants.W_OK);
      return true;
    } catch {
      return false;
    }
  }

  async close(): Promise<void> {}
}

async function writeAndSync(path: string, bytes: Uint8Array): Promise<void> {
  const file = await open(path, "w", 0o600);
  try {
    await file.writeFile(bytes);
    await file.sync();
  } finally {
    await file.close();
  }
}

/** Makes a rename durable: on Linux the new directory entry survives a crash only after the folder is synced. */
async function syncFolder(path: string): Promise<void> {
  const folder = await open(path, "r");
  try {
    await folder.sync();
  } finally {
    await folder.close();
  }
}
