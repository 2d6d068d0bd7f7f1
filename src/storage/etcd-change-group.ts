import type { Timestamp } from "@bufbuild/protobuf/wkt";
import type { ICompare, IRequestOp, ITxnRequest } from "etcd3";
import type { VerifiedFence } from "../locks/lock-service.js";
import type { EntityValue } from "../state/entity.js";
import { assertFenceCurrent } from "./assert-fence-current.js";
import type { CachedEntity, ReadCache } from "./etcd-change-cache.js";
import { decodeEntityValue, encodeEntityValue, encodeIdempotencyRecord } from "./etcd-change-codec.js";
import type { WriteRequest } from "./etcd-change-request.js";
import { fenceHeld, keyAbsent, modRevisionEquals, operationBytes, rangeKey, rangeKeyOnly } from "./etcd-change-txn.js";
import { encodeCurrentPointer, newGenerationId, type SnapshotLayout } from "./etcd-snapshot-layout.js";

/** A request as the planner needs it. */
export interface GroupMember {
  request: WriteRequest;
  /** Key of each write relative to the generation folder, in the order of `request.writes`. */
  relativeKeys: string[];
  /** SHA-256 hex digest of the request's idempotency key. */
  digest: string | undefined;
}

/** An entity key that the commit compares, with the value it leaves there. */
export interface PlannedKey {
  relativeKey: string;
  comparedModRevision: string;
  value: Buffer | undefined;
  /** False when the computes left the stored bytes as they were, so the transaction does not write the key. */
  changed: boolean;
}

export interface PlannedFence<Member> {
  fence: VerifiedFence & { etcdKey: string };
  members: Member[];
}

/**
 * One transaction for a group of requests. Its failure branch reads, in
 * this order, `current`, every key in `keys`, every record of `records` and
 * every fence key of `fences`, so a failed compare shows its cause.
 */
export interface CommitPlan<Member> {
  generation: string;
  /** mod_revision of `current` that the transaction compares. */
  currentModRevision: string;
  /** True when no state was stored, so the transaction creates `current` pointing at a new generation. */
  createsGeneration: boolean;
  /** True when the transaction puts `current`: to create it, or to store a member's timestamp. */
  writesCurrent: boolean;
  /** SystemState.timestamp that the transaction stores in `current`, from the last member that sets one. */
  timestamp: Timestamp | undefined;
  members: Array<{ member: Member; values: (EntityValue | undefined)[] }>;
  keys: PlannedKey[];
  /** Members with an idempotency record, in the order of their reads in the failure branch. */
  records: Member[];
  fences: PlannedFence<Member>[];
  txn: ITxnRequest;
  bytes: number;
}

export interface PlanOutcome<Member> {
  plan: CommitPlan<Member> | undefined;
  /** Members left for a later transaction because the group's bytes would exceed the limit, in queue order. */
  deferred: Member[];
  /** True when the first deferred member exceeds the limit on its own, so only a rewrite can apply it. */
  firstDeferredAlone: boolean;
  /** Members whose compute threw or whose in-process fence ended, with the error. */
  failed: Array<{ member: Member; error: unknown }>;
}

export interface PlanSettings {
  layout: SnapshotLayout;
  maxEntityBytes: number;
  /** Limit of the key and value bytes of one transaction. */
  maxBytes: number;
  /** Lease for idempotency records; required when a member has a digest. */
  recordLeaseId: string | undefined;
}

const absentEntity: CachedEntity = { value: undefined, modRevision: "0" };

/**
 * Computes the new values of a group and builds its commit transaction. It
 * runs the computes in member order, so a member's compute receives what the
 * members before it computed for the same entity. A member whose compute throws is left out,
 * and members that no longer fit the byte limit are deferred. `cache` must
 * hold `current` and, unless no state is stored, every key of the members.
 */
export function planCommit<Member extends GroupMember>(
  members: readonly Member[],
  cache: ReadCache,
  settings: PlanSettings,
): PlanOutcome<Member> {
  const current = cache.current;
  if (current === undefined) throw new Error("cannot plan a commit before `current` was read");
  const noState = current.generation === undefined;
  const generation = current.generation ?? newGenerationId();
  const storedEntity = (relativeKey: string): CachedEntity => {
    if (noState) return absentEntity;
    const entry = cache.get(relativeKey);
    if (entry === undefined) throw new Error(`cannot plan a commit: entity key "${relativeKey}" was not read`);
    return entry;
  };

  const outcome: PlanOutcome<Member> = { plan: undefined, deferred: [], firstDeferredAlone: false, failed: [] };
  const accepted: Array<{ member: Member; values: (EntityValue | undefined)[]; record: Buffer | undefined }> = [];
  const working = new Map<string, Buffer | undefined>();
  let bytes = fixedBytes(settings.layout, generation);
  for (const member of members) {
    if (outcome.deferred.length > 0) {
      outcome.deferred.push(member);
      continue;
    }
    let computed: ComputedMember;
    try {
      // Encoding the pointer rejects an invalid timestamp here, so only its own request fails.
      if (member.request.timestamp !== undefined) encodeCurrentPointer(generation, member.request.timestamp);
      computed = computeMember(member, (key) => (working.has(key) ? working.get(key) : storedEntity(key).value), settings);
    } catch (error) {
      outcome.failed.push({ member, error });
      continue;
    }
    const memberBytes = bytesOf(settings.layout, generation, member, computed);
    if (bytes + memberBytes > settings.maxBytes) {
      outcome.firstDeferredAlone = accepted.length === 0;
      outcome.deferred.push(member);
      continue;
    }
    bytes += memberBytes;
    for (const [key, value] of computed.staged) working.set(key, value);
    accepted.push({ member, values: computed.values, record: computed.record });
  }
  if (accepted.length === 0) return outcome;

  const keys = [...working].map(([relativeKey, value]): PlannedKey => {
    const stored = storedEntity(relativeKey);
    return { relativeKey, comparedModRevision: stored.modRevision, value, changed: !sameBytes(value, stored.value) };
  });
  const timestamp = accepted.findLast((entry) => entry.member.request.timestamp !== undefined)?.member.request.timestamp;
  const createsGeneration = noState && (timestamp !== undefined || keys.some((key) => key.changed));
  const plan: CommitPlan<Member> = {
    generation,
    currentModRevision: current.modRevision,
    createsGeneration,
    writesCurrent: createsGeneration || timestamp !== undefined,
    timestamp,
    members: accepted.map(({ member, values }) => ({ member, values })),
    keys,
    records: accepted.filter((entry) => entry.record !== undefined).map((entry) => entry.member),
    fences: fencesOf(accepted.map((entry) => entry.member)),
    txn: { compare: [], success: [], failure: [] },
    bytes,
  };
  plan.txn = buildTransaction(plan, accepted, settings);
  outcome.plan = plan;
  return outcome;
}

interface ComputedMember {
  /** New bytes of each key the member writes, undefined for a deletion. */
  staged: Map<string, Buffer | undefined>;
  values: (EntityValue | undefined)[];
  record: Buffer | undefined;
}

function computeMember(
  member: GroupMember,
  storedValue: (relativeKey: string) => Buffer | undefined,
  settings: PlanSettings,
): ComputedMember {
  const fence = member.request.fence;
  // A fence of an in-process lock cannot be compared inside the transaction, so it is checked here, just before.
  if (fence?.etcdKey === undefined) assertFenceCurrent(fence);
  const staged = new Map<string, Buffer | undefined>();
  const writes = member.request.writes;
  const values = writes.map((write, index) => {
    const relativeKey = member.relativeKeys[index]!;
    const prior = staged.has(relativeKey) ? staged.get(relativeKey) : storedValue(relativeKey);
    // Each compute gets its own decoded copy, so one that mutates its input cannot change another's.
    const stored = prior === undefined ? undefined : decodeEntityValue(write.kind, write.id, prior);
    const value = write.compute(stored);
    staged.set(relativeKey, value === undefined ? undefined : encodeEntityValue(write.kind, write.id, value, settings.maxEntityBytes));
    return value;
  });
  const record =
    member.digest === undefined
      ? undefined
      : encodeIdempotencyRecord(writes.map((write, index) => ({ kind: write.kind, id: write.id, value: values[index] })));
  return { staged, values, record };
}

/** Bytes of the operations every transaction may carry: the compare and read of `current`, the marker, and a new pointer. */
function fixedBytes(layout: SnapshotLayout, generation: string): number {
  // A timestamp in RFC 3339 with nanoseconds takes at most 50 bytes in the pointer.
  const pointerBytes = encodeCurrentPointer(generation, undefined).length + 50;
  return layout.currentKey.length * 3 + layout.changeMarkerKey(generation).length + pointerBytes;
}

/**
 * Bytes that a member adds: each entity key three times (compare, write and
 * failure read) with its value, its record key likewise with the record, and
 * its fence key twice. A key that members share is counted for each, which
 * overestimates.
 */
function bytesOf(layout: SnapshotLayout, generation: string, member: GroupMember, computed: ComputedMember): number {
  const prefixBytes = layout.generationPrefix(generation).length;
  let bytes = 0;
  for (const [relativeKey, value] of computed.staged) {
    bytes += (prefixBytes + Buffer.byteLength(relativeKey)) * 3 + (value?.length ?? 0);
  }
  if (member.digest !== undefined) bytes += layout.idempotencyKey(member.digest).length * 3 + (computed.record?.length ?? 0);
  const fenceKey = member.request.fence?.etcdKey;
  if (fenceKey !== undefined) bytes += Buffer.byteLength(fenceKey) * 2;
  return bytes;
}

/** Groups the members by fence, so two members fenced on the same grant add one compare. */
function fencesOf<Member extends GroupMember>(members: Member[]): PlannedFence<Member>[] {
  const fences = new Map<string, PlannedFence<Member>>();
  for (const member of members) {
    const fence = member.request.fence;
    if (fence?.etcdKey === undefined) continue;
    const id = fenceId(fence);
    const entry = fences.get(id) ?? { fence: { ...fence, etcdKey: fence.etcdKey }, members: [] };
    entry.members.push(member);
    fences.set(id, entry);
  }
  return [...fences.values()];
}

/** Identifies a fence by its etcd key and token, the two things its compare checks. */
export function fenceId(fence: VerifiedFence): string {
  return `${fence.etcdKey ?? ""}\n${fence.token}`;
}

function buildTransaction<Member extends GroupMember>(
  plan: CommitPlan<Member>,
  accepted: Array<{ member: Member; record: Buffer | undefined }>,
  settings: PlanSettings,
): ITxnRequest {
  const { layout } = settings;
  const compare: ICompare[] = [modRevisionEquals(layout.currentKey, plan.currentModRevision)];
  const success: IRequestOp[] = [];
  const failure: IRequestOp[] = [rangeKey(layout.currentKey)];
  const prefix = layout.generationPrefix(plan.generation);

  for (const planned of plan.keys) {
    const key = Buffer.concat([prefix, Buffer.from(planned.relativeKey, "utf8")]);
    compare.push(modRevisionEquals(key, planned.comparedModRevision));
    failure.push(rangeKeyOnly(key));
    if (!planned.changed) continue;
    success.push(planned.value === undefined ? { request_delete_range: { key } } : { request_put: { key, value: planned.value } });
  }
  for (const { member, record } of accepted) {
    if (record === undefined) continue;
    if (settings.recordLeaseId === undefined) throw new Error("cannot plan an idempotency record without its lease");
    const key = layout.idempotencyKey(member.digest!);
    compare.push(keyAbsent(key));
    success.push({ request_put: { key, value: record, lease: settings.recordLeaseId } });
    failure.push(rangeKeyOnly(key));
  }
  for (const { fence } of plan.fences) {
    compare.push(fenceHeld(fence));
    failure.push(rangeKeyOnly(Buffer.from(fence.etcdKey)));
  }
  // The marker's new mod_revision shows a concurrent rewrite that it copied the generation too early.
  if (plan.keys.some((key) => key.changed)) {
    success.push({ request_put: { key: layout.changeMarkerKey(plan.generation), value: Buffer.alloc(0) } });
  }
  if (plan.writesCurrent) {
    success.push({ request_put: { key: layout.currentKey, value: encodeCurrentPointer(plan.generation, plan.timestamp) } });
  }
  plan.bytes = operationBytes(compare, [...success, ...failure]);
  return { compare, success, failure };
}

function sameBytes(left: Buffer | undefined, right: Buffer | undefined): boolean {
  if (left === undefined || right === undefined) return left === right;
  return left.equals(right);
}
