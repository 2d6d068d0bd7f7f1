import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import type { Logger } from "pino";
import type { EntityKind } from "../gen/modelmesh/state/v1/changes_pb.js";
import {
  UpdateStateResponseSchema,
  type UpdateStateRequest,
  type UpdateStateResponse,
} from "../gen/modelmesh/state/v1/state_manager_service_pb.js";
import { SystemStateSchema, type SystemState } from "../gen/modelmesh/state/v1/state_pb.js";
import type { VerifiedFence } from "../locks/lock-service.js";
import { unavailable } from "../server/service-error.js";
import { assertFenceCurrent } from "../storage/assert-fence-current.js";
import { EtcdChangeWriter, type EntityWrite } from "../storage/etcd-change-writer.js";
import type { EtcdConnector } from "../storage/etcd-connector.js";
import { EtcdStateFollower } from "../storage/etcd-state-follower.js";
import { ChangeLog } from "./change-log.js";
import { applyChanges, computeUpdate, groupByEntity, updateResponse } from "./compute-update.js";
import { type AnyEntityChange, type EntityEvent, type EntityValue, entityKey } from "./entity.js";
import { changesOfRequest, mergeEntityChanges, removeEntityChange, replaceEntityChange } from "./entity-changes.js";
import { applyEventsInPlace, diffStates, entityMap, shallowCopy } from "./entity-events.js";
import { IdempotencyCache } from "./idempotency-cache.js";
import type { StateStore } from "./state-store.js";

/** Changes to one entity that this daemon accepted and has not written yet. */
interface PendingEntity {
  kind: EntityKind;
  id: string;
  /** The committed value when the first pending change was accepted. */
  base: EntityValue | undefined;
  changes: AnyEntityChange[];
  /** The value the daemon shows: the pending changes merged onto the latest committed value. */
  value: EntityValue | undefined;
}

export interface EtcdStateStoreOptions {
  connector: EtcdConnector;
  prefix: string;
  endpoints: string[];
  requestTimeoutMs: number;
}

/** How long a resuming watch waits for a revision that another daemon produced and this one has not seen. */
const resumeCatchUpMs = 5_000;

/**
 * Keeps the state of every daemon on one etcd prefix coherent. A follower
 * applies each committed change, from any daemon, to this daemon's copy and
 * its change log. Under the immediate policy changes are committed at once
 * (grouped by the change writer) and the call returns once the follower has
 * seen its own commit, so the next Load includes it. Under the other
 * policies changes wait in a pending set until a flush merges them onto the
 * values committed meanwhile. Concurrent additions therefore all count, and a
 * field that another daemon changed later keeps that daemon's value.
 *
 * NOTE: the merge compares values, not write times. When another daemon
 * writes a field back to the value it had when this daemon accepted its
 * change, that write is indistinguishable from no write, and the pending
 * change replaces it.
 */
export class EtcdStateStore implements StateStore {
  changeLog: ChangeLog = new ChangeLog(0n);
  private committedState: SystemState | undefined;
  private readonly pending = new Map<string, PendingEntity>();
  /** The timestamp of a Save accepted but not written yet; the entity changes cannot carry it. */
  private pendingTimestamp: { value: Timestamp | undefined } | undefined;
  private readonly idempotency = new IdempotencyCache();
  private follower: EtcdStateFollower | undefined;
  private readonly writer: EtcdChangeWriter;
  private readonly logger: Logger;
  /** The daemon's logger, for the follower and writer, which add their own component and prefix. */
  private readonly rootLogger: Logger;

  constructor(
    private readonly options: EtcdStateStoreOptions,
    logger: Logger,
  ) {
    this.rootLogger = logger;
    this.logger = logger.child({ component: "etcd-state-store", prefix: options.prefix });
    this.writer = new EtcdChangeWriter(
      {
        client: options.connector.etcdClient,
        prefix: options.prefix,
        endpoints: options.endpoints,
        requestTimeoutMs: options.requestTimeoutMs,
      },
      logger,
    );
  }

  async open(): Promise<void> {
    let first = true;
    this.follower = await EtcdStateFollower.start(
      {
        client: this.options.connector.etcdClient,
        prefix: this.options.prefix,
        endpoints: this.options.endpoints,
        requestTimeoutMs: this.options.requestTimeoutMs,
      },
      this.rootLogger,
      {
        onSnapshot: (state, revision, resync) => {
          if (first) {
            this.changeLog = new ChangeLog(revision);
            first = false;
          } else {
            this.logger.warn({ revision, resync }, "etcd history was lost; watches resume from a snapshot");
            this.changeLog.reset(revision);
          }
          this.committedState = state;
          for (const entry of this.pending.values()) this.remerge(entry);
        },
        onEvents: (events, revision) => this.applyCommitted(events, revision),
        onProgress: (revision) => this.changeLog.advance(revision),
        onTimestamp: (timestamp) => {
          this.committedState ??= create(SystemStateSchema);
          this.committedState.timestamp = timestamp;
        },
      },
    );
  }

  view(): SystemState | undefined {
    if (this.committedState === undefined && this.pending.size === 0 && this.pendingTimestamp === undefined) return undefined;
    const view = this.committedState === undefined ? create(SystemStateSchema) : shallowCopy(this.committedState);
    if (this.pendingTimestamp !== undefined) view.timestamp = this.pendingTimestamp.value;
    for (const entry of this.pending.values()) {
      const map = entityMap(view, entry.kind);
      if (entry.value === undefined) delete map[entry.id];
      else map[entry.id] = entry.value;
    }
    return view;
  }

  committed(): { state: SystemState | undefined; revision: bigint } {
    const state = this.committedState === undefined ? undefined : shallowCopy(this.committedState);
    return { state, revision: this.changeLog.revision };
  }

  async save(state: SystemState, fence: VerifiedFence | undefined, commit: boolean): Promise<void> {
    if (commit) {
      const revision = await this.options.connector.save(state, { fence });
      await this.seen(revision);
      return;
    }
    assertFenceCurrent(fence);
    this.pendingTimestamp = { value: state.timestamp };
    // A save waits as one change per entity that differs, so a flush merges it like any update.
    for (const event of diffStates(this.view(), state, 0n)) {
      const change = event.value === undefined
        ? removeEntityChange(event.kind, event.id)
        : replaceEntityChange(event.kind, event.id, event.value);
      this.addPending(event.kind, event.id, [change], event.value);
    }
  }

  async update(request: UpdateStateRequest, fence: VerifiedFence | undefined, commit: boolean): Promise<UpdateStateResponse> {
    const changes = changesOfRequest(request);
    if (commit) return await this.commitUpdate(request, changes, fence);

    const key = request.idempotencyKey;
    const replay = key === "" ? undefined : this.idempotency.get(key);
    if (replay !== undefined) return { ...fromBinary(UpdateStateResponseSchema, replay), replayed: true };
    assertFenceCurrent(fence);
    const view = this.view();
    const updates = computeUpdate(changes, (kind, id) => (view === undefined ? undefined : entityMap(view, kind)[id]));
    for (const update of updates) this.addPending(update.kind, update.id, update.changes, update.value);
    const response = updateResponse(this.changeLog.revision, updates);
    if (key !== "") this.idempotency.set(key, toBinary(UpdateStateResponseSchema, response));
    return response;
  }

  async flush(): Promise<void> {
    await this.flushEntities();
    const timestamp = this.pendingTimestamp;
    if (timestamp === undefined) return;
    const revision = await this.options.connector.setSnapshotTimestamp(timestamp.value);
    // A Save accepted while the timestamp was written keeps its own, newer timestamp pending.
    if (this.pendingTimestamp === timestamp) this.pendingTimestamp = undefined;
    await this.seen(revision);
  }

  private async flushEntities(): Promise<void> {
    const batch = [...this.pending.values()].map((entry) => ({ entry, taken: entry.changes.length, base: entry.base }));
    if (batch.length === 0) return;
    const writes: EntityWrite[] = batch.map(({ entry, taken, base }) => ({
      kind: entry.kind,
      id: entry.id,
      compute: (stored) => mergeEntityChanges(entry.kind, base, stored, entry.changes.slice(0, taken)),
    }));
    const result = await this.writer.write({ writes });
    if (result.replayed) throw new Error("the change writer returned a replay for a flush, which has no idempotency key");

    batch.forEach(({ entry, taken }, index) => {
      const written = result.values[index];
      entry.changes = entry.changes.slice(taken);
      if (entry.changes.length === 0) {
        this.pending.delete(entityKey(entry.kind, entry.id));
        return;
      }
      // Changes accepted while the flush ran stay pending, now on top of what the flush wrote.
      entry.base = written;
      entry.value = applyChanges(entry.kind, entry.id, written, entry.changes);
    });
    await this.seen(result.revision);
  }

  async isResumable(revision: bigint, signal: AbortSignal): Promise<boolean> {
    if (revision < this.changeLog.oldestResumableRevision) return false;
    if (revision > this.changeLog.revision) {
      try {
        await this.follower?.waitForRevision(revision, AbortSignal.any([signal, AbortSignal.timeout(resumeCatchUpMs)]));
      } catch {
        signal.throwIfAborted();
        return false;
      }
    }
    return !(await this.options.connector.isRevisionCompacted(revision));
  }

  async close(): Promise<void> {
    await this.writer.close();
    await this.follower?.close();
  }

  private async commitUpdate(
    request: UpdateStateRequest,
    changes: AnyEntityChange[],
    fence: VerifiedFence | undefined,
  ): Promise<UpdateStateResponse> {
    const groups = groupByEntity(changes);
    const writes: EntityWrite[] = groups.map((group) => ({
      kind: group.kind,
      id: group.id,
      compute: (stored) => applyChanges(group.kind, group.id, stored, group.changes),
    }));
    const encodeReplay = (result: { revision: bigint; values: (EntityValue | undefined)[] }) =>
      toBinary(UpdateStateResponseSchema, responseOf(result.revision, groups, result.values));
    const result = await this.writer.write({
      writes,
      fence,
      ...(request.idempotencyKey === "" ? {} : { idempotencyKey: request.idempotencyKey, encodeReplay }),
    });
    if (result.replayed) return { ...fromBinary(UpdateStateResponseSchema, result.replay), replayed: true };
    await this.seen(result.revision);
    return responseOf(result.revision, groups, result.values);
  }

  private addPending(kind: EntityKind, id: string, changes: AnyEntityChange[], value: EntityValue | undefined): void {
    const key = entityKey(kind, id);
    let entry = this.pending.get(key);
    if (entry === undefined) {
      const base = this.committedState === undefined ? undefined : entityMap(this.committedState, kind)[id];
      entry = { kind, id, base, changes: [], value };
      this.pending.set(key, entry);
    }
    entry.changes.push(...changes);
    entry.value = value;
  }

  private applyCommitted(events: EntityEvent[], revision: bigint): void {
    this.committedState ??= create(SystemStateSchema);
    applyEventsInPlace(this.committedState, events);
    this.changeLog.append(events, revision);
    for (const event of events) {
      const entry = this.pending.get(entityKey(event.kind, event.id));
      if (entry !== undefined) this.remerge(entry);
    }
  }

  /** Recomputes what the daemon shows for a pending entity after its committed value changed. */
  private remerge(entry: PendingEntity): void {
    const committed = this.committedState === undefined ? undefined : entityMap(this.committedState, entry.kind)[entry.id];
    try {
      entry.value = mergeEntityChanges(entry.kind, entry.base, committed, entry.changes);
    } catch (error) {
      // The merge can fail only if a counter would drop below zero; the flush then reports it.
      this.logger.warn({ err: error, entity: entityKey(entry.kind, entry.id) }, "cannot merge pending changes onto a newer value");
    }
  }

  /** Waits until the follower has applied `revision`, so the next Load on this daemon includes it. */
  private async seen(revision: bigint | void): Promise<void> {
    if (revision === undefined) return;
    if (this.follower === undefined) throw unavailable("the etcd state follower is not running");
    await this.follower.waitForRevision(revision);
  }
}

function responseOf(
  revision: bigint,
  groups: Array<{ kind: EntityKind; id: string }>,
  values: (EntityValue | undefined)[],
): UpdateStateResponse {
  return updateResponse(
    revision,
    groups.map((group, index) => ({ kind: group.kind, id: group.id, value: values[index] })),
  );
}
