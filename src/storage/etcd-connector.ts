import { noop } from "cockatiel";
import {
  CompareResult,
  CompareTarget,
  Etcd3,
  GRPCOutOfRangeError,
  GRPCResourceExhastedError,
  type ICompare,
  type IKeyValue,
  type IRangeResponse,
  type IRequestOp,
  type ITxnRequest,
  type Lease,
} from "etcd3";
import type { Logger } from "pino";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import type { SystemState } from "../gen/modelmesh/state/v1/state_pb.js";
import type { VerifiedFence } from "../locks/lock-service.js";
import {
  cancelled,
  deadlineExceeded,
  failedPrecondition,
  isServiceError,
  unavailable,
  type ServiceError,
} from "../server/service-error.js";
import { assertFenceCurrent } from "./assert-fence-current.js";
import { defaultBatchLimits, splitIntoBatches } from "./etcd-batches.js";
import { keyAbsent, keyExists } from "./etcd-change-txn.js";
import { writeStagedBatches } from "./etcd-staged-batches.js";
import {
  SnapshotLayout,
  decodeEntity,
  emptyState,
  encodeCurrentPointer,
  encodeEntities,
  isGenerationId,
  newGenerationId,
  parseCurrentPointer,
  prefixRangeEnd,
} from "./etcd-snapshot-layout.js";
import { ConnectorId, type SaveOptions, type StorageConnector } from "./storage-connector.js";

/** Settings of `EtcdConnector.open`. */
export interface EtcdConnectorOptions {
  /** Client URLs of the etcd cluster, such as "http://10.0.0.5:2379". */
  endpoints: string[];
  /** Key prefix of every key the connector writes, without a trailing slash. */
  prefix: string;
  /** Deadline of each etcd request, in milliseconds. */
  requestTimeoutMs: number;
  /**
   * Maximum encoded size of one model, provider or pool, in bytes. Default
   * 1 MiB, which keeps each write under etcd's default 1.5 MiB request limit.
   */
  maxEntityBytes?: number;
}

const defaultMaxEntityBytes = 1024 * 1024;

/** Lease TTL of a writer's staging key, in seconds. A dead writer's generation is removable this long after its last keepalive. */
const leaseTtlSeconds = 30;

/** Deadline of the `isReachable` probe, in milliseconds, unless requestTimeoutMs is shorter. */
const probeTimeoutMs = 1000;

/** Keys per range request. grpc-js rejects responses over 4 MiB, so a page that hits that limit is read again with fewer keys. */
const rangePageKeys = 1000;

/** Loads that restart because their revision was compacted, before the load fails. */
const maxLoadAttempts = 5;

/** Commits that retry because another save replaced `current` in between, before the save fails. */
const maxCommitAttempts = 5;


/**
 * Stores each snapshot as a generation of one etcd key per model, provider
 * and pool, and publishes it by switching the `current` pointer in one
 * transaction, so readers see the old generation or the new one, never a mix.
 */
export class EtcdConnector implements StorageConnector {
  readonly id = ConnectorId.etcd;
  private readonly layout: SnapshotLayout;
  private readonly logger: Logger;
  private readonly endpointList: string;

  private constructor(
    private readonly client: Etcd3,
    private readonly options: Required<EtcdConnectorOptions>,
    logger: Logger,
  ) {
    this.layout = new SnapshotLayout(options.prefix);
    this.endpointList = options.endpoints.join(",");
    this.logger = logger.child({ connector: this.id, endpoints: options.endpoints, prefix: options.prefix });
  }

  /**
   * Creates the etcd client and removes generations that crashed writers
   * left behind. It resolves also when etcd is unreachable, because the
   * first load or save reports that.
   */
  static async open(options: EtcdConnectorOptions, logger: Logger): Promise<EtcdConnector> {
    const resolved = resolveOptions(options);
    const client = new Etcd3({
      hosts: resolved.endpoints,
      // NOTE: etcd3 1.1.2 declares dialTimeout but reads it nowhere. The deadline below is what bounds each call.
      dialTimeout: resolved.requestTimeoutMs,
      defaultCallOptions: (context) =>
        context.isStream ? {} : { deadline: Date.now() + resolved.requestTimeoutMs },
      // The default policies of etcd3 1.1.2 retry a failed call up to three times and open a 5 s circuit
      // breaker per host. A retried transaction could apply twice, and the breaker reports etcd as down
      // for 5 s after it is back. So each call makes one attempt, and the connector decides what to retry.
      faultHandling: { host: () => noop, global: noop },
    });
    const connector = new EtcdConnector(client, resolved, logger);
    await connector.removeOrphansQuietly();
    return connector;
  }

  /** The etcd client, shared with the lock service so both use one connection and one fault policy. */
  get etcdClient(): Etcd3 {
    return this.client;
  }

  async load(signal?: AbortSignal): Promise<SystemState | undefined> {
    const startedAt = performance.now();
    for (let attempt = 1; ; attempt++) {
      throwIfAborted(signal, "load state from etcd");
      try {
        const state = await this.readSnapshot(signal);
        const durationMs = Math.round(performance.now() - startedAt);
        this.logger.debug({ found: state !== undefined, durationMs }, "state loaded from etcd");
        return state;
      } catch (error) {
        // A compaction removed the revision the load reads at, so read the pointer again and start over.
        if (error instanceof GRPCOutOfRangeError && attempt < maxLoadAttempts) {
          this.logger.info({ attempt, err: error }, "snapshot revision compacted during load, loading again");
          continue;
        }
        throw this.toServiceError(error, `cannot load state from etcd at ${this.endpointList}`);
      }
    }
  }

  async save(state: SystemState, options: SaveOptions = {}): Promise<bigint> {
    const { fence, signal } = options;
    const startedAt = performance.now();
    const generation = newGenerationId();
    // Encoding first means an oversized entity or invalid timestamp is rejected before anything is written.
    const entities = encodeEntities(this.layout, generation, state, this.options.maxEntityBytes);
    const pointer = encodeCurrentPointer(generation, state.timestamp);
    const batches = splitIntoBatches(entities, defaultBatchLimits);
    throwIfAborted(signal, "save state to etcd");
    // An in-process fence that already ended fails here, before a whole generation is written for nothing.
    if (fence?.etcdKey === undefined) assertFenceCurrent(fence);

    const lease = this.client.lease(leaseTtlSeconds);
    const onLeaseLost = (error: Error) => this.logger.warn({ err: error, generation }, "lease of an uncommitted generation lost");
    lease.on("lost", onLeaseLost);
    let step = `granting the lease of generation ${generation}`;
    let staged = false;
    let previous: string | undefined;
    let revision = 0n;
    try {
      const leaseId = await lease.grant();
      step = `staging generation ${generation}`;
      staged = true;
      await this.stageGeneration(generation, leaseId);
      step = `writing the ${batches.length} transactions of generation ${generation}`;
      await writeStagedBatches({
        client: this.client,
        stagingLeaseKey: this.layout.stagingLeaseKey(generation),
        batches,
        checkActive: () => throwIfAborted(signal, `write generation ${generation}`),
        leaseExpired: () => this.leaseExpiredError(generation),
      });
      throwIfAborted(signal, `commit generation ${generation}`);
      step = `committing generation ${generation}`;
      ({ previous, revision } = await this.commitGeneration(generation, pointer, fence));
    } catch (error) {
      if (staged) await this.discardGeneration(generation);
      throw this.toServiceError(error, `cannot save state to etcd at ${this.endpointList}: ${step} failed`);
    } finally {
      lease.off("lost", onLeaseLost);
      await this.revokeQuietly(lease, generation);
    }

    const bytes = entities.reduce((sum, entity) => sum + entity.key.length + entity.value.length, 0);
    const durationMs = Math.round(performance.now() - startedAt);
    this.logger.info(
      { generation, previous, revision, entities: entities.length, bytes, transactions: batches.length, durationMs },
      "state saved to etcd",
    );
    await this.removeOrphansQuietly();
    return revision;
  }

  /**
   * Sets the timestamp of the stored snapshot without rewriting its entities,
   * and returns the revision of the change. Resolves undefined when nothing
   * was ever saved, since there is no snapshot to stamp.
   */
  async setSnapshotTimestamp(timestamp: Timestamp | undefined): Promise<bigint | undefined> {
    const currentKey = this.layout.currentKey;
    for (let attempt = 1; attempt <= maxCommitAttempts; attempt++) {
      try {
        const response = await this.client.kv.range({ key: currentKey });
        const currentValue = response.kvs[0];
        if (currentValue === undefined) return undefined;
        const { generation } = parseCurrentPointer(currentValue.value, currentKey.toString());
        // Comparing the pointer's revision keeps a save that switched generations in between from being undone.
        const result = await this.client.kv.txn({
          compare: [{ key: currentKey, target: CompareTarget.Mod, result: CompareResult.Equal, mod_revision: currentValue.mod_revision }],
          success: [{ request_put: { key: currentKey, value: encodeCurrentPointer(generation, timestamp) } }],
        });
        if (result.succeeded) return BigInt(result.header.revision);
      } catch (error) {
        throw this.toServiceError(error, `cannot set the snapshot timestamp in etcd at ${this.endpointList}`);
      }
    }
    throw unavailable(`cannot set the snapshot timestamp in etcd at ${this.endpointList}: other saves kept replacing it`);
  }

  /**
   * Tells whether etcd has compacted away the history at `revision`, so that
   * a watch can no longer resume from it.
   */
  async isRevisionCompacted(revision: bigint): Promise<boolean> {
    try {
      await this.client.kv.range({ key: this.layout.currentKey, count_only: true, revision: revision.toString() });
      return false;
    } catch (error) {
      // etcd returns OUT_OF_RANGE both for a compacted and for a future revision.
      if (error instanceof GRPCOutOfRangeError) return true;
      throw this.toServiceError(error, `cannot read etcd at ${this.endpointList} at revision ${revision}`);
    }
  }

  async isReachable(): Promise<boolean> {
    const deadline = Date.now() + Math.min(probeTimeoutMs, this.options.requestTimeoutMs);
    try {
      await this.client.kv.range({ key: this.layout.currentKey, count_only: true }, { deadline });
      return true;
    } catch (error) {
      this.logger.debug({ err: error }, "etcd probe failed");
      return false;
    }
  }

  async close(): Promise<void> {
    this.client.close();
  }

  /** Reads `current` and then the generation it names at the same revision, so a later commit cannot mix in. */
  private async readSnapshot(signal: AbortSignal | undefined): Promise<SystemState | undefined> {
    const currentKey = this.layout.currentKey;
    const response = await this.client.kv.range({ key: currentKey });
    const currentValue = response.kvs[0];
    if (currentValue === undefined) return undefined;

    const pointer = parseCurrentPointer(currentValue.value, currentKey.toString());
    const state = emptyState(pointer.timestamp);
    const prefix = this.layout.generationPrefix(pointer.generation);
    for await (const page of this.rangePages(prefix, { revision: response.header.revision, signal })) {
      for (const entry of page.kvs) {
        decodeEntity(state, entry.key.subarray(prefix.length).toString("utf8"), entry.value, entry.key.toString());
      }
    }
    return state;
  }

  /**
   * Reads every key under `prefix` page by page. Without a revision, the
   * pages after the first are read at the first page's revision, so the
   * listing is one consistent view.
   */
  private async *rangePages(
    prefix: Buffer,
    options: { revision?: string; keysOnly?: boolean; signal?: AbortSignal | undefined },
  ): AsyncGenerator<IRangeResponse> {
    const rangeEnd = prefixRangeEnd(prefix);
    let key = prefix;
    let limit = rangePageKeys;
    let revision = options.revision;
    for (;;) {
      throwIfAborted(options.signal, `read etcd keys under "${prefix.toString()}"`);
      let page: IRangeResponse;
      try {
        page = await this.client.kv.range({
          key,
          range_end: rangeEnd,
          limit,
          revision: revision ?? 0,
          keys_only: options.keysOnly ?? false,
        });
      } catch (error) {
        // grpc-js raises RESOURCE_EXHAUSTED for a response over its 4 MiB receive limit.
        if (error instanceof GRPCResourceExhastedError && limit > 1) {
          limit = Math.ceil(limit / 4);
          this.logger.debug({ limit, prefix: prefix.toString() }, "etcd range response too large, reading fewer keys per page");
          continue;
        }
        throw error;
      }
      revision ??= page.header.revision;
      yield page;
      const last = page.kvs.at(-1);
      if (!page.more || last === undefined) return;
      key = Buffer.concat([last.key, Buffer.from([0])]);
    }
  }

  /** Records that `generation` exists, and that its writer is alive while `leaseId` is. */
  private async stageGeneration(generation: string, leaseId: string): Promise<void> {
    await this.client.kv.txn({
      success: [
        { request_put: { key: this.layout.stagingKey(generation), value: Buffer.from(new Date().toISOString()) } },
        { request_put: { key: this.layout.stagingLeaseKey(generation), value: Buffer.alloc(0), lease: leaseId } },
      ],
    });
  }

  /**
   * Points `current` at `generation`, deletes the generation it replaces and
   * the staging keys in one transaction, and returns the replaced generation.
   * The transaction applies only while the writer's lease key exists, the
   * fence's lock key is unchanged, and `current` is unchanged since it was
   * read. A concurrent save that commits in between makes it read `current`
   * again, so the last writer wins and no replaced generation is left behind.
   */
  private async commitGeneration(
    generation: string,
    pointer: Buffer,
    fence: VerifiedFence | undefined,
  ): Promise<{ previous: string | undefined; revision: bigint }> {
    const currentKey = this.layout.currentKey;
    for (let attempt = 1; attempt <= maxCommitAttempts; attempt++) {
      // A fence of an in-process lock cannot be compared inside the transaction, so it is checked just before.
      if (fence?.etcdKey === undefined) assertFenceCurrent(fence);
      const response = await this.client.kv.range({ key: currentKey });
      const currentValue = response.kvs[0];
      const previous = currentValue === undefined ? undefined : this.committedGeneration(currentValue);

      const result = await this.client.kv.txn(this.commitRequest(generation, pointer, currentValue, previous, fence));
      if (result.succeeded) return { previous, revision: BigInt(result.header.revision) };

      // The failure branch reads the staging lease key first, then the fence's lock key.
      if (result.responses[0]?.response_range.count === "0") throw this.leaseExpiredError(generation);
      if (fence?.etcdKey !== undefined) {
        const lockEntry = result.responses[1]?.response_range.kvs[0];
        if (lockEntry?.create_revision !== fence.token.toString()) throw this.fenceEndedError(fence);
      }
      this.logger.info({ generation, attempt }, "another save committed first, committing again");
    }
    throw unavailable(
      `cannot commit generation ${generation}: "${currentKey.toString()}" changed during each of ${maxCommitAttempts} attempts`,
    );
  }

  private commitRequest(
    generation: string,
    pointer: Buffer,
    currentValue: IKeyValue | undefined,
    previous: string | undefined,
    fence: VerifiedFence | undefined,
  ): ITxnRequest {
    const currentKey = this.layout.currentKey;
    const stagingLeaseKey = this.layout.stagingLeaseKey(generation);
    const compare: ICompare[] = [
      keyExists(stagingLeaseKey),
      {
        key: currentKey,
        target: CompareTarget.Mod,
        result: CompareResult.Equal,
        // An absent key compares as mod_revision 0 in etcd.
        mod_revision: currentValue?.mod_revision ?? 0,
      },
    ];
    const success: IRequestOp[] = [
      { request_put: { key: currentKey, value: pointer } },
      { request_delete_range: { key: this.layout.stagingKey(generation) } },
      { request_delete_range: { key: stagingLeaseKey } },
    ];
    const failure: IRequestOp[] = [{ request_range: { key: stagingLeaseKey, count_only: true } }];
    if (previous !== undefined) success.push(this.deleteGenerationOp(previous));
    if (fence?.etcdKey !== undefined) {
      // The lock holder's queue key keeps the create revision that became its fencing token.
      const fenceKey = Buffer.from(fence.etcdKey);
      compare.push({
        key: fenceKey,
        target: CompareTarget.Create,
        result: CompareResult.Equal,
        create_revision: fence.token.toString(),
      });
      failure.push({ request_range: { key: fenceKey, keys_only: true } });
    }
    return { compare, success, failure };
  }

  /** Returns the generation that a `current` value names, or undefined when the value cannot be parsed. */
  private committedGeneration(currentValue: IKeyValue): string | undefined {
    try {
      return parseCurrentPointer(currentValue.value, currentValue.key.toString()).generation;
    } catch (error) {
      this.logger.warn({ err: error }, "current pointer unreadable, replacing it without deleting the generation it named");
      return undefined;
    }
  }

  /**
   * Deletes an uncommitted generation after a failed save. The staging key
   * exists only while a generation is uncommitted, because the commit deletes
   * it, so this never deletes a committed generation, also when the commit's
   * outcome is unknown. Failures are only logged, because a later open or
   * save removes the generation once its lease has expired.
   */
  private async discardGeneration(generation: string): Promise<void> {
    const stagingKey = this.layout.stagingKey(generation);
    try {
      const result = await this.client.kv.txn({
        compare: [keyExists(stagingKey)],
        success: [
          this.deleteGenerationOp(generation),
          { request_delete_range: { key: stagingKey } },
          { request_delete_range: { key: this.layout.stagingLeaseKey(generation) } },
        ],
      });
      this.logger.info({ generation, deleted: result.succeeded }, "uncommitted generation discarded");
    } catch (error) {
      this.logger.warn({ err: error, generation }, "cannot discard uncommitted generation, leaving it to orphan removal");
    }
  }

  private async revokeQuietly(lease: Lease, generation: string): Promise<void> {
    try {
      await lease.revoke();
    } catch (error) {
      // The lease then expires after its TTL.
      this.logger.warn({ err: error, generation, leaseTtlSeconds }, "cannot revoke the lease of a generation");
    }
  }

  private async removeOrphansQuietly(): Promise<void> {
    try {
      await this.removeOrphans();
    } catch (error) {
      this.logger.warn({ err: error }, "cannot remove orphan generations from etcd");
    }
  }

  /**
   * Deletes generations whose writer died before committing. Their staging
   * key exists but their lease key is gone. Such a generation is never the
   * current one, since the commit that makes a generation current deletes its
   * staging key in the same transaction.
   */
  private async removeOrphans(): Promise<void> {
    const staged: string[] = [];
    let revision: string | undefined;
    for await (const page of this.rangePages(this.layout.stagingPrefix, { keysOnly: true })) {
      revision ??= page.header.revision;
      staged.push(...generationIdsOf(page.kvs, this.layout.stagingPrefix));
    }
    if (staged.length === 0) return;

    const alive = new Set<string>();
    for await (const page of this.rangePages(this.layout.stagingLeasePrefix, { keysOnly: true, revision })) {
      for (const id of generationIdsOf(page.kvs, this.layout.stagingLeasePrefix)) alive.add(id);
    }

    for (const generation of staged.filter((id) => !alive.has(id))) {
      const stagingKey = this.layout.stagingKey(generation);
      const result = await this.client.kv.txn({
        compare: [keyExists(stagingKey), keyAbsent(this.layout.stagingLeaseKey(generation))],
        success: [this.deleteGenerationOp(generation), { request_delete_range: { key: stagingKey } }],
      });
      if (result.succeeded) this.logger.info({ generation }, "orphan generation removed");
    }
  }

  private deleteGenerationOp(generation: string): IRequestOp {
    const prefix = this.layout.generationPrefix(generation);
    return { request_delete_range: { key: prefix, range_end: prefixRangeEnd(prefix) } };
  }

  private leaseExpiredError(generation: string): ServiceError {
    return unavailable(
      `cannot commit generation ${generation}: its writer's lease expired before the commit, ` +
        `so "${this.layout.currentKey.toString()}" was left unchanged; save again`,
    );
  }

  private fenceEndedError(fence: VerifiedFence): ServiceError {
    return failedPrecondition(
      `cannot save with fencing token ${fence.token}: lock "${fence.lockName}" was released or expired before the commit`,
    );
  }

  /** Passes deliberate errors through and turns etcd client errors into UNAVAILABLE. */
  private toServiceError(error: unknown, context: string): ServiceError {
    if (isServiceError(error)) return error;
    const reason = error instanceof Error ? error.message : String(error);
    return unavailable(`${context}: ${reason}`, error);
  }
}

function resolveOptions(options: EtcdConnectorOptions): Required<EtcdConnectorOptions> {
  if (options.endpoints.length === 0) {
    throw new Error("cannot open the etcd connector: no endpoints are configured");
  }
  if (!(options.requestTimeoutMs > 0)) {
    throw new Error(`cannot open the etcd connector: requestTimeoutMs must be positive, got ${options.requestTimeoutMs}`);
  }
  const maxEntityBytes = options.maxEntityBytes ?? defaultMaxEntityBytes;
  if (!Number.isInteger(maxEntityBytes) || maxEntityBytes <= 0) {
    throw new Error(`cannot open the etcd connector: maxEntityBytes must be a positive integer, got ${maxEntityBytes}`);
  }
  return { ...options, maxEntityBytes };
}

/** Returns the generation ids that the keys under `prefix` end with, skipping keys of other shapes. */
function generationIdsOf(kvs: IKeyValue[], prefix: Buffer): string[] {
  return kvs.map((entry) => entry.key.subarray(prefix.length).toString("utf8")).filter(isGenerationId);
}

/** Throws CANCELLED, or DEADLINE_EXCEEDED for an `AbortSignal.timeout`, once `signal` is aborted. */
function throwIfAborted(signal: AbortSignal | undefined, action: string): void {
  if (signal === undefined || !signal.aborted) return;
  const reason: unknown = signal.reason;
  if (reason instanceof DOMException && reason.name === "TimeoutError") {
    throw deadlineExceeded(`cannot ${action}: the request timed out`);
  }
  throw cancelled(`cannot ${action}: the request was cancelled`);
}
