import {
  EtcdLeaseInvalidError,
  GRPCOutOfRangeError,
  GRPCResourceExhastedError,
  type Etcd3,
  type ICompare,
  type IRangeResponse,
  type IRequestOp,
  type ITxnResponse,
  type Lease,
} from "etcd3";
import type { Logger } from "pino";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { resourceExhausted, unavailable, type ServiceError } from "../server/service-error.js";
import type { EntityValue } from "../state/entity.js";
import { assertFenceCurrent } from "./assert-fence-current.js";
import { defaultBatchLimits, splitIntoBatches, type KeyValue } from "./etcd-batches.js";
import { decodeEntityValue, decodeIdempotencyRecord, encodeEntityValue, encodeIdempotencyRecord, type RecordedValue } from "./etcd-change-codec.js";
import type { IdempotencyLease } from "./etcd-change-lease.js";
import type { WriteRequest } from "./etcd-change-request.js";
import {
  backoff,
  fenceEndedError,
  fenceHeld,
  isFenceCurrent,
  keyAbsent,
  keyExists,
  modRevisionEquals,
  modRevisionOf,
  operationBytes,
  rangeKey,
  rangeKeyOnly,
  toServiceError,
} from "./etcd-change-txn.js";
import {
  encodeCurrentPointer,
  isChangeMarker,
  newGenerationId,
  parseCurrentPointer,
  prefixRangeEnd,
  type SnapshotLayout,
} from "./etcd-snapshot-layout.js";
import { writeStagedBatches } from "./etcd-staged-batches.js";

/** Dependencies of a rewrite, provided by its writer. */
export interface RewriteContext {
  client: Etcd3;
  layout: SnapshotLayout;
  /** Endpoints joined by commas, for error messages. */
  endpointList: string;
  requestTimeoutMs: number;
  maxEntityBytes: number;
  idempotencyLease: IdempotencyLease;
  logger: Logger;
}

/** One request too large for a single transaction. */
export interface RewriteTask {
  request: WriteRequest;
  /** Key of each write relative to the generation folder, in the order of `request.writes`. */
  relativeKeys: string[];
  /** SHA-256 hex digest of the request's idempotency key. */
  digest: string | undefined;
  /** Throws when the request may no longer commit, because it was aborted or the writer closed. */
  checkActive(): void;
  /** Like `checkActive`, and from then on an abort no longer takes the request out. */
  enterCommit(): void;
  /** Called when the commit did not apply, so an abort takes the request out again. */
  leaveCommit(): void;
}

export type RewriteOutcome =
  | { replayed: false; revision: bigint; values: (EntityValue | undefined)[]; generation: string }
  | { replayed: true; revision: bigint; record: RecordedValue[] };

/**
 * Rewrites that restart because another writer changed the generation
 * between the read and the commit, before the request fails. Each attempt
 * copies the whole generation, so the bound is lower than for small commits.
 * NOTE: other daemons that commit small changes more often than one copy
 * takes can make every attempt fail, and the request then fails with
 * UNAVAILABLE, because nothing pauses the other writers during a rewrite.
 */
const maxRewriteAttempts = 10;

/** Lease TTL of the staging key, in seconds; the same as the connector's, so its orphan removal treats both alike. */
const stagingLeaseTtlSeconds = 30;

/** Keys per range request; a page over grpc-js's 4 MiB receive limit is read again with fewer keys. */
const rangePageKeys = 1000;

/** The current generation read at one revision. */
interface GenerationSnapshot {
  revision: string;
  currentModRevision: string;
  /** Absent when no state is stored yet. */
  generation: string | undefined;
  timestamp: Timestamp | undefined;
  /** Entity keys relative to the generation folder, with their stored values. */
  entries: Map<string, Buffer>;
  markerModRevision: string;
  /** The record of the request's idempotency key, when it exists. */
  record: { value: Buffer; modRevision: string } | undefined;
  fenceRange: IRangeResponse | undefined;
}

/**
 * Applies a request that needs more operations or bytes than one etcd
 * transaction allows, by copy and switch. It reads the whole current
 * generation at one revision and applies the computes. Then it writes the
 * result as a new generation in batches and switches `current` to it in one
 * transaction. That transaction applies only while `current` and the old
 * generation's change marker are unchanged since the read, so a change that
 * another writer made in between is never lost: the rewrite discards its
 * copy and starts over. The new generation is staged like a connector save,
 * so the connector's orphan removal deletes it if this process dies first.
 */
export async function rewriteGeneration(context: RewriteContext, task: RewriteTask): Promise<RewriteOutcome> {
  const writes = task.request.writes.length;
  for (let attempt = 1; attempt <= maxRewriteAttempts; attempt++) {
    task.checkActive();
    let snapshot: GenerationSnapshot;
    try {
      snapshot = await readGeneration(context, task);
    } catch (error) {
      if (error instanceof GRPCOutOfRangeError) {
        context.logger.debug({ attempt, err: error }, "generation revision compacted during a rewrite, reading again");
        continue;
      }
      throw toServiceError(error, `cannot update state in etcd at ${context.endpointList}: reading the current generation failed`);
    }
    if (snapshot.record !== undefined) return replayOf(context, task, snapshot.record);
    assertFenceBeforeCopy(task, snapshot);

    const values = applyWrites(task, snapshot.entries, context.maxEntityBytes);
    const outcome = await stageAndCommit(context, task, snapshot, values);
    if (outcome !== undefined) return outcome;

    context.logger.debug(
      { attempt, writes, generation: snapshot.generation },
      "generation changed during a rewrite, copying it again",
    );
    await backoff(attempt);
  }
  throw unavailable(
    `cannot commit ${writes} changes to etcd at ${context.endpointList}: too much contention, ` +
      `because other writers changed generation entities during each of ${maxRewriteAttempts} rewrites`,
  );
}

/** Fails early on a fence that ended, before a whole generation is copied for nothing. The commit checks it again. */
function assertFenceBeforeCopy(task: RewriteTask, snapshot: GenerationSnapshot): void {
  const fence = task.request.fence;
  if (fence === undefined) return;
  if (fence.etcdKey === undefined) {
    assertFenceCurrent(fence);
  } else if (!isFenceCurrent(snapshot.fenceRange, fence)) {
    throw fenceEndedError(fence);
  }
}

async function readGeneration(context: RewriteContext, task: RewriteTask): Promise<GenerationSnapshot> {
  const { client, layout } = context;
  const currentKey = layout.currentKey;
  const recordKey = task.digest === undefined ? undefined : layout.idempotencyKey(task.digest);
  const fenceKey = task.request.fence?.etcdKey;
  const reads: IRequestOp[] = [rangeKey(currentKey)];
  if (recordKey !== undefined) reads.push(rangeKey(recordKey));
  if (fenceKey !== undefined) reads.push(rangeKeyOnly(Buffer.from(fenceKey)));
  const response = await client.kv.txn({ success: reads }, { deadline: Date.now() + context.requestTimeoutMs });

  const ranges = response.responses.map((entry) => entry.response_range);
  const currentEntry = ranges[0]?.kvs[0];
  const recordEntry = recordKey === undefined ? undefined : ranges[1]?.kvs[0];
  const pointer = currentEntry === undefined ? undefined : parseCurrentPointer(currentEntry.value, currentKey.toString());
  const snapshot: GenerationSnapshot = {
    revision: response.header.revision,
    currentModRevision: modRevisionOf(ranges[0]),
    generation: pointer?.generation,
    timestamp: pointer?.timestamp,
    entries: new Map(),
    markerModRevision: "0",
    record: recordEntry === undefined ? undefined : { value: recordEntry.value, modRevision: recordEntry.mod_revision },
    fenceRange: fenceKey === undefined ? undefined : ranges.at(-1),
  };
  if (snapshot.record !== undefined || snapshot.generation === undefined) return snapshot;

  const prefix = layout.generationPrefix(snapshot.generation);
  for await (const page of rangePages(context, prefix, snapshot.revision)) {
    for (const entry of page.kvs) {
      const relativeKey = entry.key.subarray(prefix.length).toString("utf8");
      if (isChangeMarker(relativeKey)) snapshot.markerModRevision = entry.mod_revision;
      // Keys of unknown shapes are copied as they are, so the rewrite changes nothing it was not asked to.
      else snapshot.entries.set(relativeKey, entry.value);
    }
  }
  return snapshot;
}

/** Reads every key under `prefix` at `revision`, page by page. */
async function* rangePages(context: RewriteContext, prefix: Buffer, revision: string): AsyncGenerator<IRangeResponse> {
  const rangeEnd = prefixRangeEnd(prefix);
  let key = prefix;
  let limit = rangePageKeys;
  for (;;) {
    let page: IRangeResponse;
    try {
      page = await context.client.kv.range(
        { key, range_end: rangeEnd, limit, revision },
        { deadline: Date.now() + context.requestTimeoutMs },
      );
    } catch (error) {
      // grpc-js raises RESOURCE_EXHAUSTED for a response over its 4 MiB receive limit.
      if (error instanceof GRPCResourceExhastedError && limit > 1) {
        limit = Math.ceil(limit / 4);
        continue;
      }
      throw error;
    }
    yield page;
    const last = page.kvs.at(-1);
    if (!page.more || last === undefined) return;
    key = Buffer.concat([last.key, Buffer.from([0])]);
  }
}

/** Applies the computes in request order to `entries`, and returns what each returned. */
function applyWrites(task: RewriteTask, entries: Map<string, Buffer>, maxEntityBytes: number): (EntityValue | undefined)[] {
  return task.request.writes.map((write, index) => {
    const relativeKey = task.relativeKeys[index]!;
    const storedBytes = entries.get(relativeKey);
    const stored = storedBytes === undefined ? undefined : decodeEntityValue(write.kind, write.id, storedBytes);
    const value = write.compute(stored);
    if (value === undefined) entries.delete(relativeKey);
    else entries.set(relativeKey, encodeEntityValue(write.kind, write.id, value, maxEntityBytes));
    return value;
  });
}

/**
 * Writes `snapshot.entries` as a new generation and tries once to switch
 * `current` to it. Returns undefined when another writer changed the old
 * generation or `current` first, after discarding the new generation.
 */
async function stageAndCommit(
  context: RewriteContext,
  task: RewriteTask,
  snapshot: GenerationSnapshot,
  values: (EntityValue | undefined)[],
): Promise<RewriteOutcome | undefined> {
  const { client, layout, logger } = context;
  const generation = newGenerationId();
  const prefix = layout.generationPrefix(generation);
  const entities: KeyValue[] = [...snapshot.entries].map(([relativeKey, value]) => ({
    key: Buffer.concat([prefix, Buffer.from(relativeKey, "utf8")]),
    value,
  }));
  const batches = splitIntoBatches(entities, defaultBatchLimits);
  const record = task.digest === undefined ? undefined : recordOf(task, values);
  assertCommitFits(task, record);
  // Encoding the pointer first rejects an invalid timestamp before anything is written.
  const pointer = encodeCurrentPointer(generation, task.request.timestamp ?? snapshot.timestamp);

  const lease = client.lease(stagingLeaseTtlSeconds, { deadline: Date.now() + context.requestTimeoutMs });
  const onLeaseLost = (error: Error) => logger.warn({ err: error, generation }, "lease of an uncommitted generation lost");
  lease.on("lost", onLeaseLost);
  let step = `granting the lease of generation ${generation}`;
  let staged = false;
  try {
    const leaseId = await lease.grant();
    step = `staging generation ${generation}`;
    staged = true;
    await stageGeneration(context, generation, leaseId);
    step = `writing the ${batches.length} transactions of generation ${generation}`;
    await writeStagedBatches({
      client: context.client,
      stagingLeaseKey: context.layout.stagingLeaseKey(generation),
      batches,
      checkActive: () => task.checkActive(),
      leaseExpired: () => leaseExpiredError(context, generation),
      callOptions: () => ({ deadline: Date.now() + context.requestTimeoutMs }),
    });
    step = `granting the idempotency lease`;
    const recordLeaseId = record === undefined ? undefined : await context.idempotencyLease.leaseId();
    step = `committing generation ${generation}`;
    task.enterCommit();
    const outcome = await commitGeneration(context, task, snapshot, { generation, pointer, values, record, recordLeaseId });
    if (outcome === undefined || outcome.replayed) {
      task.leaveCommit();
      await discardGeneration(context, generation);
    }
    return outcome;
  } catch (error) {
    if (staged) await discardGeneration(context, generation);
    throw toServiceError(error, `cannot update state in etcd at ${context.endpointList}: ${step} failed`);
  } finally {
    lease.off("lost", onLeaseLost);
    await revokeQuietly(context, lease, generation);
  }
}

function recordOf(task: RewriteTask, values: (EntityValue | undefined)[]): Buffer {
  return encodeIdempotencyRecord(task.request.writes.map((write, index) => ({ kind: write.kind, id: write.id, value: values[index] })));
}

/** Rejects, before anything is written, a request whose idempotency record cannot fit in the switching transaction. */
function assertCommitFits(task: RewriteTask, record: Buffer | undefined): void {
  if (record === undefined) return;
  const limit = defaultBatchLimits.maxBytes;
  if (record.length > limit) {
    throw resourceExhausted(
      `cannot update state: the idempotency record of ${task.request.writes.length} changes is ${record.length} bytes, ` +
        `over the etcd limit of ${limit} bytes; send the changes in smaller requests or without an idempotency key`,
    );
  }
}

/** Records that `generation` exists, and that its writer is alive while `leaseId` is. */
async function stageGeneration(context: RewriteContext, generation: string, leaseId: string): Promise<void> {
  const { layout } = context;
  await context.client.kv.txn(
    {
      success: [
        { request_put: { key: layout.stagingKey(generation), value: Buffer.from(new Date().toISOString()) } },
        { request_put: { key: layout.stagingLeaseKey(generation), value: Buffer.alloc(0), lease: leaseId } },
      ],
    },
    { deadline: Date.now() + context.requestTimeoutMs },
  );
}

/**
 * Switches `current` to `generation`, deletes the old generation and the
 * staging keys, and creates the idempotency record, in one transaction.
 * Returns undefined when `current` or the old generation's change marker
 * changed since the snapshot was read, or when etcd no longer has the
 * idempotency lease.
 */
async function commitGeneration(
  context: RewriteContext,
  task: RewriteTask,
  snapshot: GenerationSnapshot,
  copy: {
    generation: string;
    pointer: Buffer;
    values: (EntityValue | undefined)[];
    record: Buffer | undefined;
    recordLeaseId: string | undefined;
  },
): Promise<RewriteOutcome | undefined> {
  const { layout } = context;
  const { generation, values, record, recordLeaseId } = copy;
  const stagingLeaseKey = layout.stagingLeaseKey(generation);
  const recordKey = task.digest === undefined ? undefined : layout.idempotencyKey(task.digest);
  const fence = task.request.fence;
  const compare: ICompare[] = [keyExists(stagingLeaseKey), modRevisionEquals(layout.currentKey, snapshot.currentModRevision)];
  const success: IRequestOp[] = [
    { request_put: { key: layout.currentKey, value: copy.pointer } },
    { request_delete_range: { key: layout.stagingKey(generation) } },
    { request_delete_range: { key: stagingLeaseKey } },
  ];
  const failure: IRequestOp[] = [{ request_range: { key: stagingLeaseKey, count_only: true } }];
  if (snapshot.generation !== undefined) {
    // The marker is absent until the first small change, and etcd compares an absent key as mod_revision 0.
    compare.push(modRevisionEquals(layout.changeMarkerKey(snapshot.generation), snapshot.markerModRevision));
    const oldPrefix = layout.generationPrefix(snapshot.generation);
    success.push({ request_delete_range: { key: oldPrefix, range_end: prefixRangeEnd(oldPrefix) } });
  }
  if (recordKey !== undefined) {
    compare.push(keyAbsent(recordKey));
    success.push({ request_put: { key: recordKey, value: record!, lease: recordLeaseId! } });
    failure.push(rangeKeyOnly(recordKey));
  }
  if (fence?.etcdKey !== undefined) {
    compare.push(fenceHeld({ ...fence, etcdKey: fence.etcdKey }));
    failure.push(rangeKeyOnly(Buffer.from(fence.etcdKey)));
  }
  context.logger.debug({ generation, bytes: operationBytes(compare, success) }, "committing a rewritten generation");

  // A fence of an in-process lock cannot be compared inside the transaction, so it is checked just before.
  assertFenceCurrent(fence?.etcdKey === undefined ? fence : undefined);
  let response: ITxnResponse;
  try {
    response = await context.client.kv.txn({ compare, success, failure }, { deadline: Date.now() + context.requestTimeoutMs });
  } catch (error) {
    // etcd checks leases before it applies a transaction, so nothing was written and the rewrite can start over.
    if (!(error instanceof EtcdLeaseInvalidError) || recordLeaseId === undefined) throw error;
    context.logger.debug({ leaseId: recordLeaseId }, "idempotency lease not found, granting a new one");
    context.idempotencyLease.invalidate(recordLeaseId);
    return undefined;
  }
  if (response.succeeded) return { replayed: false, revision: BigInt(response.header.revision), values, generation };

  const ranges = response.responses.map((entry) => entry.response_range);
  if (ranges[0]?.count === "0") throw leaseExpiredError(context, generation);
  if (fence?.etcdKey !== undefined && !isFenceCurrent(ranges.at(-1), fence)) throw fenceEndedError(fence);
  if (recordKey !== undefined && (ranges[1]?.kvs.length ?? 0) > 0) {
    const replay = await readRecord(context, recordKey);
    if (replay !== undefined) return replayOf(context, task, replay);
  }
  return undefined;
}

async function readRecord(context: RewriteContext, recordKey: Buffer): Promise<{ value: Buffer; modRevision: string } | undefined> {
  const response = await context.client.kv.range({ key: recordKey }, { deadline: Date.now() + context.requestTimeoutMs });
  const entry = response.kvs[0];
  return entry === undefined ? undefined : { value: entry.value, modRevision: entry.mod_revision };
}

function replayOf(context: RewriteContext, task: RewriteTask, record: { value: Buffer; modRevision: string }): RewriteOutcome {
  const key = context.layout.idempotencyKey(task.digest!).toString();
  return { replayed: true, revision: BigInt(record.modRevision), record: decodeIdempotencyRecord(record.value, key) };
}

/**
 * Deletes an uncommitted generation. The staging key exists only until the
 * generation's commit, so this never deletes a committed generation, also
 * when the commit's outcome is unknown. Failures are only logged, because the
 * connector's orphan removal deletes the generation once its lease expired.
 */
async function discardGeneration(context: RewriteContext, generation: string): Promise<void> {
  const { layout } = context;
  const stagingKey = layout.stagingKey(generation);
  const prefix = layout.generationPrefix(generation);
  try {
    const result = await context.client.kv.txn(
      {
        compare: [keyExists(stagingKey)],
        success: [
          { request_delete_range: { key: prefix, range_end: prefixRangeEnd(prefix) } },
          { request_delete_range: { key: stagingKey } },
          { request_delete_range: { key: layout.stagingLeaseKey(generation) } },
        ],
      },
      { deadline: Date.now() + context.requestTimeoutMs },
    );
    context.logger.debug({ generation, deleted: result.succeeded }, "uncommitted generation discarded");
  } catch (error) {
    context.logger.warn({ err: error, generation }, "cannot discard uncommitted generation, leaving it to orphan removal");
  }
}

async function revokeQuietly(context: RewriteContext, lease: Lease, generation: string): Promise<void> {
  try {
    await lease.revoke({ deadline: Date.now() + context.requestTimeoutMs });
  } catch (error) {
    // The lease then expires after its TTL.
    context.logger.warn({ err: error, generation, stagingLeaseTtlSeconds }, "cannot revoke the lease of a generation");
  }
}

function leaseExpiredError(context: RewriteContext, generation: string): ServiceError {
  return unavailable(
    `cannot commit generation ${generation}: its writer's lease expired before the commit, ` +
      `so "${context.layout.currentKey.toString()}" was left unchanged; send the request again`,
  );
}
