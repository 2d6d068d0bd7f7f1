import { status as GrpcStatus } from "@grpc/grpc-js";
import { EtcdLeaseInvalidError, GRPCResourceExhastedError, type Etcd3, type IRangeResponse, type ITxnResponse } from "etcd3";
import type { Logger } from "pino";
import { invalidArgument, isServiceError, unavailable, type ServiceError } from "../server/service-error.js";
import { entityKindName } from "../state/entity.js";
import { defaultBatchLimits } from "./etcd-batches.js";
import { ReadCache, currentOf } from "./etcd-change-cache.js";
import { decodeIdempotencyRecord, idempotencyDigest, relativeEntityKey, type RecordedValue } from "./etcd-change-codec.js";
import { fenceId, planCommit, type CommitPlan, type GroupMember, type PlanOutcome } from "./etcd-change-group.js";
import { IdempotencyLease } from "./etcd-change-lease.js";
import type { WriteRequest, WriteResult } from "./etcd-change-request.js";
import { rewriteGeneration, type RewriteContext, type RewriteTask } from "./etcd-change-rewrite.js";
import { backoff, fenceEndedError, isFenceCurrent, modRevisionOf, rangeKey, toServiceError } from "./etcd-change-txn.js";
import { SnapshotLayout } from "./etcd-snapshot-layout.js";

export type { CommitResult, EntityWrite, WriteRequest, WriteResult } from "./etcd-change-request.js";

/** Settings of an EtcdChangeWriter. */
export interface EtcdChangeWriterOptions {
  /** etcd client with its deadlines and fault handling, such as the connector's. The writer never closes it. */
  client: Etcd3;
  /** Key prefix of the connector whose state the writer changes, without a trailing slash. */
  prefix: string;
  /** Client URLs of the etcd cluster, for error messages. */
  endpoints: string[];
  /** Deadline of each etcd request, in milliseconds. */
  requestTimeoutMs: number;
  /** How long an idempotency key keeps a request from applying again, in milliseconds. Default 24 h. */
  idempotencyTtlMs?: number;
  /** Maximum encoded size of one model, provider or pool, in bytes. Default 1 MiB, the connector's default. */
  maxEntityBytes?: number;
}

/** Counters of a writer since it was created. */
export interface ChangeWriterStats {
  /** Commit transactions sent for groups of requests, including those whose compare failed. */
  transactions: number;
  /** Read-only transactions of groups: entities missing from the cache, and records of replays. */
  reads: number;
  /** Group transactions that applied. */
  commits: number;
  /** Requests that group transactions applied. */
  requestsCommitted: number;
  /** Group transactions whose compare failed, so the group was read and computed again. */
  conflicts: number;
  /** Requests too large for one transaction, applied by copying the generation. */
  rewrites: number;
}

const defaultIdempotencyTtlMs = 24 * 60 * 60 * 1000;
const defaultMaxEntityBytes = 1024 * 1024;

/** Attempts of one group before its requests fail with UNAVAILABLE. */
const maxCommitAttempts = 20;

/**
 * Operations of a group transaction besides those of its requests: the
 * compare and read of `current` in one branch, the marker and a new
 * `current` in the other.
 */
const fixedOperations = 2;

/** Rounds of reading the stored entities before giving up because `current` keeps switching generations. */
const maxReadRounds = 5;

/** Entity values a writer keeps from its reads and commits. */
const maxCachedEntities = 10_000;

/**
 * State of a request: waiting in the queue, in a group being read and
 * computed (an abort still takes it out), in a commit transaction in flight
 * (an abort no longer does), or resolved or rejected.
 */
type PendingState = "queued" | "grouped" | "committing" | "settled";

interface PendingRequest extends GroupMember {
  /** Operations the request adds to a transaction: its distinct entity keys, its record and its fence. */
  operations: number;
  /** Set when the request cannot fit one transaction, so it runs alone as a rewrite. */
  large: boolean;
  state: PendingState;
  resolve(result: WriteResult): void;
  reject(error: unknown): void;
  /** Removes the abort listener. */
  detach(): void;
}

/**
 * Applies changes to single entities of the etcd connector's current
 * generation, atomically per request and with optimistic concurrency, so
 * that concurrent additions from many writers in many daemons all count.
 *
 * While one commit transaction is in flight, further requests queue, and the
 * next transaction carries every queued request that fits (group commit).
 * Each request resolves after the transaction that applied it, with that
 * transaction's revision. A request too large for one transaction runs alone
 * and rewrites the whole generation (see `rewriteGeneration`).
 */
export class EtcdChangeWriter {
  private readonly client: Etcd3;
  private readonly layout: SnapshotLayout;
  private readonly logger: Logger;
  private readonly endpointList: string;
  private readonly requestTimeoutMs: number;
  private readonly maxEntityBytes: number;
  private readonly idempotencyLease: IdempotencyLease;
  private readonly cache = new ReadCache(maxCachedEntities);
  private readonly counters: ChangeWriterStats = {
    transactions: 0,
    reads: 0,
    commits: 0,
    requestsCommitted: 0,
    conflicts: 0,
    rewrites: 0,
  };
  private queue: PendingRequest[] = [];
  private draining: Promise<void> | undefined;
  private closed = false;

  constructor(options: EtcdChangeWriterOptions, logger: Logger) {
    const { idempotencyTtlMs, maxEntityBytes } = resolveOptions(options);
    this.client = options.client;
    this.layout = new SnapshotLayout(options.prefix);
    this.endpointList = options.endpoints.join(",");
    this.requestTimeoutMs = options.requestTimeoutMs;
    this.maxEntityBytes = maxEntityBytes;
    this.logger = logger.child({ component: "change-writer", prefix: options.prefix });
    this.idempotencyLease = new IdempotencyLease(options.client, idempotencyTtlMs, options.requestTimeoutMs, this.logger);
  }

  /** Counters since the writer was created, such as how many transactions its groups took. */
  get stats(): Readonly<ChangeWriterStats> {
    return { ...this.counters };
  }

  /**
   * Queues a request and resolves once a transaction applied it, or with the
   * first result when its idempotency key was used before. It rejects with
   * the error of its own compute or fence, with `signal.reason` when aborted
   * before its commit, or with UNAVAILABLE when etcd fails or the writer is
   * closed.
   */
  write(request: WriteRequest): Promise<WriteResult> {
    return new Promise<WriteResult>((resolve, reject) => {
      if (this.closed) throw this.closedError();
      request.signal?.throwIfAborted();
      const relativeKeys = request.writes.map((write) => {
        if (write.id === "") throw invalidArgument(`cannot update a ${entityKindName(write.kind)}: its id is empty`);
        return relativeEntityKey(write.kind, write.id);
      });
      const key = request.idempotencyKey;
      const pending: PendingRequest = {
        request,
        relativeKeys,
        digest: key === undefined || key === "" ? undefined : idempotencyDigest(key),
        operations: 0,
        large: false,
        state: "queued",
        resolve,
        reject,
        detach: () => {},
      };
      pending.operations = operationsOf(pending);
      pending.large = fixedOperations + pending.operations > defaultBatchLimits.maxOperations;
      const signal = request.signal;
      if (signal !== undefined) {
        const onAbort = () => this.abort(pending, signal.reason);
        signal.addEventListener("abort", onAbort, { once: true });
        pending.detach = () => signal.removeEventListener("abort", onAbort);
      }
      this.queue.push(pending);
      this.scheduleDrain();
    });
  }

  /**
   * Rejects every queued request with UNAVAILABLE and waits for the
   * transaction in flight, whose requests get its outcome. It leaves the
   * etcd client open, and the idempotency lease to expire on its own.
   */
  async close(): Promise<void> {
    this.closed = true;
    const queued = this.queue;
    this.queue = [];
    for (const pending of queued) this.rejectPending(pending, this.closedError());
    await this.draining;
  }

  private scheduleDrain(): void {
    if (this.draining !== undefined) return;
    this.draining = this.drain().finally(() => {
      this.draining = undefined;
      if (!this.closed && this.queue.length > 0) this.scheduleDrain();
    });
  }

  private async drain(): Promise<void> {
    // Waiting for the next turn of the event loop lets every write() of the current burst join the first group.
    await new Promise((resolve) => setImmediate(resolve));
    while (!this.closed && this.queue.length > 0) {
      const head = this.queue[0]!;
      if (head.large) {
        this.queue.shift();
        await this.runRewrite(head);
        continue;
      }
      const group = this.takeGroup();
      try {
        await this.commitGroup(group);
      } catch (error) {
        // Only a defect gets here; rejecting keeps callers from waiting forever.
        this.logger.warn({ err: error, requests: group.length }, "change group failed unexpectedly");
        for (const pending of group) this.rejectPending(pending, error);
      }
    }
  }

  /**
   * Takes queued requests in order while their operations fit one
   * transaction. It stops at a large request, so that one runs next and
   * alone, and skips a request whose idempotency key is already in the group,
   * so it runs later and finds the first one's record.
   */
  private takeGroup(): PendingRequest[] {
    const group: PendingRequest[] = [];
    const remaining: PendingRequest[] = [];
    const keys = new Set<string>();
    const digests = new Set<string>();
    const fences = new Set<string>();
    let operations = fixedOperations;
    let full = false;
    for (const pending of this.queue) {
      if (full || pending.large || (pending.digest !== undefined && digests.has(pending.digest))) {
        full ||= pending.large;
        remaining.push(pending);
        continue;
      }
      const newKeys = new Set(pending.relativeKeys.filter((key) => !keys.has(key)));
      const fence = pending.request.fence;
      const newFence = fence?.etcdKey !== undefined && !fences.has(fenceId(fence));
      const added = newKeys.size + (pending.digest === undefined ? 0 : 1) + (newFence ? 1 : 0);
      if (operations + added > defaultBatchLimits.maxOperations) {
        full = true;
        remaining.push(pending);
        continue;
      }
      operations += added;
      for (const key of newKeys) keys.add(key);
      if (pending.digest !== undefined) digests.add(pending.digest);
      if (newFence) fences.add(fenceId(fence));
      pending.state = "grouped";
      group.push(pending);
    }
    this.queue = remaining;
    return group;
  }

  /** Reads, computes and commits a group until its transaction applies, retrying after conflicts. */
  private async commitGroup(group: PendingRequest[]): Promise<void> {
    const startedAt = performance.now();
    for (let attempt = 1; ; attempt++) {
      const members = this.activeMembers(group);
      if (members.length === 0) return;
      if (this.closed) {
        for (const pending of members) this.rejectPending(pending, this.closedError());
        return;
      }
      if (attempt > maxCommitAttempts) {
        const error = unavailable(
          `cannot commit ${members.length} requests to etcd at ${this.endpointList}: too much contention, ` +
            `because the entities they change were changed by other writers during each of ${maxCommitAttempts} attempts`,
        );
        this.failMembers(members, error);
        return;
      }

      let recordLeaseId: string | undefined;
      let step = "reading the stored entities";
      try {
        await this.readStored(members);
        step = "granting the idempotency lease";
        if (members.some((pending) => pending.digest !== undefined)) recordLeaseId = await this.idempotencyLease.leaseId();
      } catch (error) {
        this.failMembers(members, toServiceError(error, `cannot update state in etcd at ${this.endpointList}: ${step} failed`));
        return;
      }

      // Nothing awaits from here to sending the transaction, so no abort can slip in between the computes and the commit.
      const outcome = planCommit(this.activeMembers(group), this.cache, {
        layout: this.layout,
        maxEntityBytes: this.maxEntityBytes,
        maxBytes: defaultBatchLimits.maxBytes,
        recordLeaseId,
      });
      this.settlePlanOutcome(outcome);
      const plan = outcome.plan;
      if (plan === undefined) continue;
      for (const { member } of plan.members) member.state = "committing";
      this.counters.transactions++;

      let response: ITxnResponse;
      try {
        response = await this.client.kv.txn(plan.txn, { deadline: Date.now() + this.requestTimeoutMs });
      } catch (error) {
        for (const { member } of plan.members) if (member.state === "committing") member.state = "grouped";
        // etcd checks leases before it applies a transaction, so this error means nothing was written.
        if (error instanceof EtcdLeaseInvalidError && recordLeaseId !== undefined) {
          this.logger.debug({ leaseId: recordLeaseId }, "idempotency lease not found, granting a new one");
          this.idempotencyLease.invalidate(recordLeaseId);
          continue;
        }
        // The transaction may have applied, so nothing is retried and the cache may be stale.
        this.cache.clear();
        const context =
          `cannot update state in etcd at ${this.endpointList}: ` +
          `committing ${plan.members.length} requests failed, and they may or may not have been applied`;
        this.failMembers(plan.members.map(({ member }) => member), toServiceError(error, context));
        return;
      }

      if (response.succeeded) {
        this.finishCommit(plan, response, attempt, startedAt);
        return;
      }
      for (const { member } of plan.members) if (member.state === "committing") member.state = "grouped";
      this.counters.conflicts++;
      let contention: boolean;
      try {
        contention = await this.resolveConflict(plan, response);
      } catch (error) {
        const context = `cannot update state in etcd at ${this.endpointList}: reading the keys of a failed commit failed`;
        this.failMembers(this.activeMembers(group), toServiceError(error, context));
        return;
      }
      if (contention) await backoff(attempt);
    }
  }

  /** Returns the members still waiting for a commit, and rejects those whose signal was aborted during a failed commit. */
  private activeMembers(group: PendingRequest[]): PendingRequest[] {
    const active: PendingRequest[] = [];
    for (const pending of group) {
      if (pending.state !== "grouped") continue;
      const signal = pending.request.signal;
      if (signal?.aborted) {
        this.rejectPending(pending, signal.reason);
        continue;
      }
      active.push(pending);
    }
    return active;
  }

  /**
   * Makes sure the cache contains `current` and every entity key of `members`,
   * reading what is missing in one transaction together with `current`, so
   * the keys are read in the generation that is current.
   */
  private async readStored(members: PendingRequest[]): Promise<void> {
    const currentKey = this.layout.currentKey;
    for (let round = 1; round <= maxReadRounds; round++) {
      if (this.cache.current === undefined) {
        const [range] = await this.readKeys([currentKey]);
        this.cache.setCurrent(currentOf(range, currentKey));
      }
      const current = this.cache.current!;
      // Without a stored state every entity is absent, in a generation the commit creates.
      if (current.generation === undefined) return;
      const missing = [...new Set(members.flatMap((pending) => pending.relativeKeys))].filter(
        (key) => this.cache.get(key) === undefined,
      );
      if (missing.length === 0) return;

      const prefix = this.layout.generationPrefix(current.generation);
      const keys = missing.map((key) => Buffer.concat([prefix, Buffer.from(key, "utf8")]));
      const ranges = await this.readKeys([currentKey, ...keys]);
      const seen = currentOf(ranges[0], currentKey);
      this.cache.setCurrent(seen);
      if (seen.generation !== current.generation) {
        this.logger.debug({ generation: seen.generation, previous: current.generation }, "current generation switched, reading again");
        continue;
      }
      missing.forEach((key, index) => {
        const entry = ranges[index + 1]?.kvs[0];
        this.cache.set(key, { value: entry?.value, modRevision: entry?.mod_revision ?? "0" });
      });
      return;
    }
    throw unavailable(`"${currentKey.toString()}" switched to another generation during each of ${maxReadRounds} reads`);
  }

  /** Reads single keys in one transaction, splitting it when the response exceeds grpc-js's 4 MiB receive limit. */
  private async readKeys(keys: Buffer[]): Promise<IRangeResponse[]> {
    this.counters.reads++;
    try {
      const response = await this.client.kv.txn({ success: keys.map(rangeKey) }, { deadline: Date.now() + this.requestTimeoutMs });
      return response.responses.map((entry) => entry.response_range);
    } catch (error) {
      if (!(error instanceof GRPCResourceExhastedError) || keys.length < 2) throw error;
      const middle = Math.ceil(keys.length / 2);
      return [...(await this.readKeys(keys.slice(0, middle))), ...(await this.readKeys(keys.slice(middle)))];
    }
  }

  /** Rejects the members whose compute failed, and returns deferred members to the front of the queue. */
  private settlePlanOutcome(outcome: PlanOutcome<PendingRequest>): void {
    for (const { member, error } of outcome.failed) {
      const level = isServiceError(error) ? "debug" : "warn";
      this.logger[level]({ err: error, entities: member.relativeKeys }, "change request rejected by its compute or fence");
      this.rejectPending(member, error);
    }
    if (outcome.deferred.length === 0) return;
    if (outcome.firstDeferredAlone) outcome.deferred[0]!.large = true;
    for (const pending of outcome.deferred) pending.state = "queued";
    this.queue.unshift(...outcome.deferred);
    this.logger.debug(
      { deferred: outcome.deferred.length, rewrite: outcome.firstDeferredAlone },
      "change requests deferred to a later transaction, because the group exceeds the etcd request size limit",
    );
  }

  private finishCommit(plan: CommitPlan<PendingRequest>, response: ITxnResponse, attempts: number, startedAt: number): void {
    const revision = response.header.revision;
    if (plan.writesCurrent) this.cache.setCurrent({ generation: plan.generation, modRevision: revision });
    if (this.cache.current?.generation === plan.generation) {
      for (const key of plan.keys) {
        let modRevision = key.comparedModRevision;
        // A deleted key is absent, and etcd compares an absent key as mod_revision 0.
        if (key.changed) modRevision = key.value === undefined ? "0" : revision;
        this.cache.set(key.relativeKey, { value: key.value, modRevision });
      }
    }
    for (const { member, values } of plan.members) {
      this.resolvePending(member, { replayed: false, revision: BigInt(revision), values });
    }
    this.counters.commits++;
    this.counters.requestsCommitted += plan.members.length;
    this.logger.debug(
      {
        requests: plan.members.length,
        entities: plan.keys.length,
        changed: plan.keys.filter((key) => key.changed).length,
        bytes: plan.bytes,
        revision,
        attempts,
        durationMs: Math.round(performance.now() - startedAt),
      },
      "change group committed",
    );
  }

  /**
   * Finds out from the failure branch's reads why a commit's compare failed.
   * It drops stale cache entries, rejects members whose fence ended, and
   * resolves members whose idempotency record now exists with their replay.
   * Returns true when other writers changed `current` or the entities, so the
   * group should back off before it retries.
   */
  private async resolveConflict(plan: CommitPlan<PendingRequest>, response: ITxnResponse): Promise<boolean> {
    const ranges = response.responses.map((entry) => entry.response_range);
    let index = 0;
    const currentKey = this.layout.currentKey;
    const current = currentOf(ranges[index++], currentKey);
    const currentChanged = current.modRevision !== plan.currentModRevision;
    if (currentChanged) this.cache.setCurrent(current);

    let staleKeys = 0;
    for (const key of plan.keys) {
      if (modRevisionOf(ranges[index++]) === key.comparedModRevision) continue;
      this.cache.delete(key.relativeKey);
      staleKeys++;
    }
    const recorded: PendingRequest[] = [];
    for (const member of plan.records) {
      if ((ranges[index++]?.kvs.length ?? 0) > 0) recorded.push(member);
    }
    let endedFences = 0;
    for (const { fence, members } of plan.fences) {
      if (isFenceCurrent(ranges[index++], fence)) continue;
      endedFences++;
      for (const member of members) this.rejectPending(member, fenceEndedError(fence));
    }
    const expiredRecords = recorded.length === 0 ? 0 : await this.replayRecorded(recorded);

    let contention = currentChanged || staleKeys > 0 || expiredRecords > 0;
    if (!contention && recorded.length === 0 && endedFences === 0) {
      // No read explains the failure, so everything is read again.
      this.cache.clear();
      contention = true;
    }
    this.logger.debug(
      { requests: plan.members.length, currentChanged, staleKeys, replays: recorded.length - expiredRecords, endedFences },
      "change group commit conflicted",
    );
    return contention;
  }

  /** Resolves each member with the record its idempotency key left, and returns how many records expired meanwhile. */
  private async replayRecorded(members: PendingRequest[]): Promise<number> {
    const keys = members.map((member) => this.layout.idempotencyKey(member.digest!));
    const ranges = await this.readKeys(keys);
    let expired = 0;
    members.forEach((member, index) => {
      const entry = ranges[index]?.kvs[0];
      if (entry === undefined) {
        expired++;
        return;
      }
      try {
        const record = decodeIdempotencyRecord(entry.value, keys[index]!.toString());
        this.resolveReplay(member, record, BigInt(entry.mod_revision));
      } catch (error) {
        this.rejectPending(member, error);
      }
    });
    return expired;
  }

  /** Resolves a request with the result that the first request under its idempotency key committed. */
  private resolveReplay(pending: PendingRequest, record: RecordedValue[], revision: bigint): void {
    const writes = pending.request.writes;
    const sameEntities =
      record.length === writes.length &&
      record.every((entry, index) => entry.kind === writes[index]!.kind && entry.id === writes[index]!.id);
    if (!sameEntities) {
      throw invalidArgument(
        `cannot apply the request with idempotency key "${pending.request.idempotencyKey}": ` +
          `an earlier request with this key changed other entities; use a new key for a different request`,
      );
    }
    const values = record.map((entry) => entry.value);
    const replay = pending.request.encodeReplay?.({ revision, values }) ?? new Uint8Array();
    this.logger.debug({ revision, entities: values.length }, "change request replayed from its idempotency record");
    this.resolvePending(pending, { replayed: true, revision, values, replay });
  }

  /** Applies a request too large for one transaction by rewriting the generation, while no group runs. */
  private async runRewrite(pending: PendingRequest): Promise<void> {
    pending.state = "grouped";
    const startedAt = performance.now();
    const task: RewriteTask = {
      request: pending.request,
      relativeKeys: pending.relativeKeys,
      digest: pending.digest,
      checkActive: () => this.checkActive(pending),
      enterCommit: () => {
        this.checkActive(pending);
        pending.state = "committing";
      },
      leaveCommit: () => {
        pending.state = "grouped";
      },
    };
    try {
      const outcome = await rewriteGeneration(this.rewriteContext(), task);
      if (outcome.replayed) {
        this.resolveReplay(pending, outcome.record, outcome.revision);
        return;
      }
      this.cache.setCurrent({ generation: outcome.generation, modRevision: outcome.revision.toString() });
      this.counters.rewrites++;
      this.logger.debug(
        {
          generation: outcome.generation,
          entities: pending.request.writes.length,
          revision: outcome.revision,
          durationMs: Math.round(performance.now() - startedAt),
        },
        "large change request committed as a new generation",
      );
      this.resolvePending(pending, { replayed: false, revision: outcome.revision, values: outcome.values });
    } catch (error) {
      // An abort rejected the request already; the error it caused here is only its echo.
      if (isSettled(pending)) return;
      if (isServiceError(error) && error.code !== GrpcStatus.UNAVAILABLE) {
        this.logger.debug({ err: error, entities: pending.request.writes.length }, "large change request rejected");
      } else {
        this.logger.warn({ err: error, entities: pending.request.writes.length }, "cannot commit a large change request");
      }
      this.rejectPending(pending, error);
    }
  }

  private rewriteContext(): RewriteContext {
    return {
      client: this.client,
      layout: this.layout,
      endpointList: this.endpointList,
      requestTimeoutMs: this.requestTimeoutMs,
      maxEntityBytes: this.maxEntityBytes,
      idempotencyLease: this.idempotencyLease,
      logger: this.logger,
    };
  }

  /** Throws when a rewrite may no longer commit: its request was aborted and rejected, or the writer closed. */
  private checkActive(pending: PendingRequest): void {
    if (pending.state === "settled") throw new Error("the change request was already settled");
    if (this.closed) throw this.closedError();
  }

  private abort(pending: PendingRequest, reason: unknown): void {
    if (pending.state === "queued") {
      this.queue = this.queue.filter((entry) => entry !== pending);
      this.rejectPending(pending, reason);
    } else if (pending.state === "grouped") {
      // The group leaves it out when it next computes; once its commit is in flight, the commit's outcome counts.
      this.rejectPending(pending, reason);
    }
  }

  private failMembers(members: PendingRequest[], error: ServiceError): void {
    this.logger.warn({ err: error, requests: members.length }, "cannot commit change requests");
    for (const pending of members) this.rejectPending(pending, error);
  }

  private resolvePending(pending: PendingRequest, result: WriteResult): void {
    if (pending.state === "settled") return;
    pending.state = "settled";
    pending.detach();
    pending.resolve(result);
  }

  private rejectPending(pending: PendingRequest, error: unknown): void {
    if (pending.state === "settled") return;
    pending.state = "settled";
    pending.detach();
    pending.reject(error);
  }

  private closedError(): ServiceError {
    return unavailable(`cannot update state in etcd at ${this.endpointList}: the change writer is closed`);
  }
}

/** Reads the state through a call, so TypeScript does not narrow it from an assignment before an await. */
function isSettled(pending: PendingRequest): boolean {
  return pending.state === "settled";
}

/** Returns the operations a request adds to a transaction on its own. */
function operationsOf(pending: PendingRequest): number {
  const fence = pending.request.fence;
  return new Set(pending.relativeKeys).size + (pending.digest === undefined ? 0 : 1) + (fence?.etcdKey === undefined ? 0 : 1);
}

function resolveOptions(options: EtcdChangeWriterOptions): { idempotencyTtlMs: number; maxEntityBytes: number } {
  if (options.endpoints.length === 0) {
    throw new Error("cannot create the etcd change writer: no endpoints are configured");
  }
  if (!(options.requestTimeoutMs > 0)) {
    throw new Error(`cannot create the etcd change writer: requestTimeoutMs must be positive, got ${options.requestTimeoutMs}`);
  }
  const idempotencyTtlMs = options.idempotencyTtlMs ?? defaultIdempotencyTtlMs;
  if (!(idempotencyTtlMs > 0)) {
    throw new Error(`cannot create the etcd change writer: idempotencyTtlMs must be positive, got ${idempotencyTtlMs}`);
  }
  const maxEntityBytes = options.maxEntityBytes ?? defaultMaxEntityBytes;
  if (!Number.isInteger(maxEntityBytes) || maxEntityBytes <= 0) {
    throw new Error(`cannot create the etcd change writer: maxEntityBytes must be a positive integer, got ${maxEntityBytes}`);
  }
  return { idempotencyTtlMs, maxEntityBytes };
}
