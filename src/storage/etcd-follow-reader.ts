import { GRPCOutOfRangeError, GRPCResourceExhastedError, type Etcd3, type IRangeResponse } from "etcd3";
import type { Logger } from "pino";
import type { FollowedKeyParser } from "./etcd-follow-keys.js";
import type { GenerationEntry } from "./etcd-follow-mirror.js";
import { prefixRangeEnd, type SnapshotLayout } from "./etcd-snapshot-layout.js";

/** Keys per range request. grpc-js rejects responses over 4 MiB, so a page that hits that limit is read again with fewer keys. */
const rangePageKeys = 1000;

/** The range requests of the state follower, each bounded by the request timeout. Errors are the etcd client's own. */
export class EtcdFollowReader {
  constructor(
    private readonly client: Etcd3,
    private readonly layout: SnapshotLayout,
    private readonly keys: FollowedKeyParser,
    private readonly requestTimeoutMs: number,
    private readonly logger: Logger,
  ) {}

  /** Reads `P/current` at the newest revision, and returns that revision with the value, if any. */
  async readCurrent(): Promise<{ revision: bigint; value: Buffer | undefined }> {
    const response = await this.client.kv.range({ key: this.layout.currentKey }, this.callOptions());
    return { revision: BigInt(response.header.revision), value: response.kvs[0]?.value };
  }

  /**
   * Reads every entity of `generation` at `revision`, page by page. A
   * revision that etcd compacted meanwhile fails with GRPCOutOfRangeError.
   */
  async *readGeneration(generation: string, revision: bigint, signal: AbortSignal): AsyncGenerator<GenerationEntry[]> {
    const prefix = this.layout.generationPrefix(generation);
    const rangeEnd = prefixRangeEnd(prefix);
    let key = prefix;
    let limit = rangePageKeys;
    for (;;) {
      signal.throwIfAborted();
      let page: IRangeResponse;
      try {
        page = await this.client.kv.range(
          { key, range_end: rangeEnd, limit, revision: revision.toString() },
          this.callOptions(),
        );
      } catch (error) {
        // grpc-js raises RESOURCE_EXHAUSTED for a response over its 4 MiB receive limit.
        if (error instanceof GRPCResourceExhastedError && limit > 1) {
          limit = Math.ceil(limit / 4);
          this.logger.debug({ limit, generation }, "etcd range response too large, reading fewer keys per page");
          continue;
        }
        throw error;
      }

      const entries: GenerationEntry[] = [];
      for (const entry of page.kvs) {
        const parsed = this.keys.parse(entry.key);
        // The `last-change` marker of the per-entity writer lives in the generation's folder too.
        if (parsed.type !== "entity" || parsed.generation !== generation) continue;
        entries.push({ kind: parsed.kind, id: parsed.id, key: entry.key.toString("utf8"), value: entry.value });
      }
      yield entries;

      const last = page.kvs.at(-1);
      if (!page.more || last === undefined) return;
      key = Buffer.concat([last.key, Buffer.from([0])]);
    }
  }

  /**
   * Returns whether etcd still keeps `revision`, that is whether no
   * compaction has gone past it. A range at a compacted revision fails with
   * OUT_OF_RANGE ("required revision has been compacted").
   */
  async isRevisionRetained(revision: bigint): Promise<boolean> {
    try {
      await this.client.kv.range(
        { key: this.layout.currentKey, revision: revision.toString(), count_only: true },
        this.callOptions(),
      );
      return true;
    } catch (error) {
      if (error instanceof GRPCOutOfRangeError) return false;
      throw error;
    }
  }

  private callOptions(): { deadline: number } {
    return { deadline: Date.now() + this.requestTimeoutMs };
  }
}
