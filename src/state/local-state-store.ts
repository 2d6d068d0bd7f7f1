import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import type { Logger } from "pino";
import {
  UpdateStateResponseSchema,
  type UpdateStateRequest,
  type UpdateStateResponse,
} from "../gen/modelmesh/state/v1/state_manager_service_pb.js";
import { SystemStateSchema, type SystemState } from "../gen/modelmesh/state/v1/state_pb.js";
import type { VerifiedFence } from "../locks/lock-service.js";
import { assertFenceCurrent } from "../storage/assert-fence-current.js";
import type { StorageConnector } from "../storage/storage-connector.js";
import { ChangeLog } from "./change-log.js";
import { computeUpdate, eventOf, updateResponse } from "./compute-update.js";
import { changesOfRequest } from "./entity-changes.js";
import { applyEventsInPlace, diffStates, entityMap, shallowCopy } from "./entity-events.js";
import { IdempotencyCache } from "./idempotency-cache.js";
import type { StateStore } from "./state-store.js";

/** A change waiting for the next committed write, with what to do once it is committed or has failed. */
interface QueuedCommit {
  /** Applies the change to `candidate` and returns what to run after the write succeeded. */
  apply(candidate: SystemState): () => void;
  reject(error: unknown): void;
}

/**
 * Keeps the state in this process and writes it whole through a connector
 * (local file or memory). Revisions count the changes since the daemon
 * started, so they restart at 0 with it. Committed writes are grouped: the
 * changes that arrive while one write runs go out together in the next.
 */
export class LocalStateStore implements StateStore {
  readonly changeLog = new ChangeLog(0n);
  private state: SystemState | undefined;
  private revision = 0n;
  private readonly idempotency = new IdempotencyCache();
  private readonly inFlight = new Map<string, Promise<UpdateStateResponse>>();
  private readonly queue: QueuedCommit[] = [];
  private writing = false;

  constructor(
    private readonly connector: StorageConnector,
    private readonly logger: Logger,
  ) {}

  async open(loadPersisted: boolean): Promise<void> {
    if (loadPersisted) this.state = await this.connector.load();
  }

  view(): SystemState | undefined {
    return this.state === undefined ? undefined : shallowCopy(this.state);
  }

  committed(): { state: SystemState | undefined; revision: bigint } {
    return { state: this.view(), revision: this.revision };
  }

  async save(state: SystemState, fence: VerifiedFence | undefined, commit: boolean): Promise<void> {
    if (!commit) {
      assertFenceCurrent(fence);
      this.replace(state);
      return;
    }
    await this.enqueue((candidate) => {
      assertFenceCurrent(fence);
      // The candidate takes the new state's entities, so later queued changes apply on top of them.
      candidate.models = { ...state.models };
      candidate.providers = { ...state.providers };
      candidate.pools = { ...state.pools };
      candidate.timestamp = state.timestamp;
      return () => this.replace(state);
    });
  }

  async update(request: UpdateStateRequest, fence: VerifiedFence | undefined, commit: boolean): Promise<UpdateStateResponse> {
    const key = request.idempotencyKey;
    const replay = key === "" ? undefined : this.idempotency.get(key);
    if (replay !== undefined) return { ...fromBinary(UpdateStateResponseSchema, replay), replayed: true };
    // A retry that arrives while the first request still waits for its write gets that request's outcome.
    const inFlight = key === "" ? undefined : this.inFlight.get(key);
    if (inFlight !== undefined) return { ...(await inFlight), replayed: true };
    if (key === "") return await this.apply(request, fence, commit);

    const applying = this.apply(request, fence, commit);
    this.inFlight.set(key, applying);
    try {
      return await applying;
    } finally {
      this.inFlight.delete(key);
    }
  }

  private async apply(request: UpdateStateRequest, fence: VerifiedFence | undefined, commit: boolean): Promise<UpdateStateResponse> {
    const key = request.idempotencyKey;

    const changes = changesOfRequest(request);
    let response: UpdateStateResponse | undefined;
    // Computes first and changes `target` only when every change applies, so a request applies whole or not at all.
    const applyTo = (target: SystemState) => {
      assertFenceCurrent(fence);
      const updates = computeUpdate(changes, (kind, id) => entityMap(target, kind)[id]);
      applyEventsInPlace(target, updates.map((update) => eventOf(update, 0n)));
      return () => {
        this.revision++;
        const events = updates.map((update) => eventOf(update, this.revision));
        if (this.state === undefined && !commit) this.state = target;
        else if (target !== this.state) applyEventsInPlace(this.ensureState(), events);
        this.changeLog.append(events, this.revision);
        response = updateResponse(this.revision, updates);
        if (key !== "") this.idempotency.set(key, toBinary(UpdateStateResponseSchema, response));
      };
    };

    if (commit) await this.enqueue(applyTo);
    else applyTo(this.state ?? create(SystemStateSchema))();
    return response!;
  }

  async flush(): Promise<void> {
    if (this.state !== undefined) await this.connector.save(shallowCopy(this.state));
  }

  async isResumable(revision: bigint): Promise<boolean> {
    // Revisions restart with the daemon, so one above the current revision comes from an earlier run.
    return revision >= this.changeLog.oldestResumableRevision && revision <= this.changeLog.revision;
  }

  async close(): Promise<void> {
    for (const queued of this.queue.splice(0)) queued.reject(new Error("the state store is closing"));
  }

  private ensureState(): SystemState {
    this.state ??= create(SystemStateSchema);
    return this.state;
  }

  private replace(state: SystemState): void {
    this.revision++;
    const events = diffStates(this.state, state, this.revision);
    this.state = state;
    this.changeLog.append(events, this.revision);
  }

  private enqueue(apply: QueuedCommit["apply"]): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.queue.push({
        apply: (candidate) => {
          const finish = apply(candidate);
          return () => {
            finish();
            resolve();
          };
        },
        reject,
      });
      if (!this.writing) void this.writeQueued();
    });
  }

  /** Writes every queued change in one connector save, repeating while more arrive. */
  private async writeQueued(): Promise<void> {
    this.writing = true;
    try {
      while (this.queue.length > 0) {
        const batch = this.queue.splice(0);
        const candidate = this.state === undefined ? create(SystemStateSchema) : shallowCopy(this.state);
        const finishers: Array<() => void> = [];
        const applied: QueuedCommit[] = [];
        for (const queued of batch) {
          // A change that cannot apply fails alone, before it changed the candidate.
          try {
            finishers.push(queued.apply(candidate));
            applied.push(queued);
          } catch (error) {
            queued.reject(error);
          }
        }
        if (finishers.length === 0) continue;
        try {
          await this.connector.save(candidate);
        } catch (error) {
          this.logger.warn({ err: error, changes: finishers.length }, "cannot write grouped changes");
          for (const queued of applied) queued.reject(error);
          continue;
        }
        for (const finish of finishers) finish();
      }
    } finally {
      this.writing = false;
    }
  }
}
