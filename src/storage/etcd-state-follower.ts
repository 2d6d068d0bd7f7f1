import { setTimeout as sleep } from "node:timers/promises";
import { noop } from "cockatiel";
import { Etcd3, GRPCOutOfRangeError, type IEvent, type IWatchCreateRequest } from "etcd3";
import type { Logger } from "pino";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import type { SystemState } from "../gen/modelmesh/state/v1/state_pb.js";
import { unavailable } from "../server/service-error.js";
import { entityKey, type EntityEvent } from "../state/entity.js";
import { EntityDecoder, FollowedKeyParser, type FollowedKey } from "./etcd-follow-keys.js";
import {
  GenerationDiff,
  SnapshotBuilder,
  mirrorPut,
  removalEvents,
  type EntityMirror,
} from "./etcd-follow-mirror.js";
import { EtcdFollowReader } from "./etcd-follow-reader.js";
import { EtcdFollowStream, type FollowStreamListener } from "./etcd-follow-stream.js";
import { SnapshotLayout, parseCurrentPointer, prefixRangeEnd } from "./etcd-snapshot-layout.js";

/** Settings of `EtcdStateFollower.start`. */
export interface EtcdStateFollowerOptions {
  /** Client for the follower's range requests, usually the connector's. The follower never closes it. */
  client: Etcd3;
  /** Key prefix of the etcd connector, without a trailing slash. */
  prefix: string;
  /** Client URLs of the etcd cluster. The watch runs on a client of its own, connected to these. */
  endpoints: string[];
  /** Deadline of each etcd range request, in milliseconds. */
  requestTimeoutMs: number;
}

/** Receivers of the committed state. The follower calls them one at a time, in revision order. */
export interface FollowerHandlers {
  /**
   * The whole committed state at `revision`: at start, and again after the
   * watch lost history (compaction), with `resync` true. `state` is
   * undefined when nothing was ever saved.
   */
  onSnapshot(state: SystemState | undefined, revision: bigint, resync: boolean): void;
  /** Entity changes committed at `revision`, one etcd revision per call, in revision order. */
  onEvents(events: EntityEvent[], revision: bigint): void;
  /**
   * The follower has seen everything up to `revision`, also when no entity
   * changed (a lock key moved, say). Not called for the revision of a snapshot.
   */
  onProgress?(revision: bigint): void;
  /** A save at `revision` set the snapshot timestamp, which entity events do not carry. Called before its events. */
  onTimestamp?(timestamp: Timestamp | undefined, revision: bigint): void;
}

/**
 * States of a follower:
 * - `starting` reads the first snapshot.
 * - `connecting` has requested a watch from etcd and checks that no history was lost.
 * - `watching` applies watch responses.
 * - `reconnecting` waits to open a new watch after a stream failed.
 * - `resyncing` reads the whole state again after history was lost.
 * - `closed` is final.
 */
type FollowerState = "starting" | "connecting" | "watching" | "reconnecting" | "resyncing" | "closed";

const allowedTransitions: Record<FollowerState, readonly FollowerState[]> = {
  starting: ["connecting", "closed"],
  connecting: ["watching", "reconnecting", "resyncing", "closed"],
  watching: ["reconnecting", "resyncing", "closed"],
  reconnecting: ["connecting", "closed"],
  resyncing: ["connecting", "closed"],
  closed: [],
};

/** Report of a watch stream, queued so that responses are applied one at a time and in order. */
type StreamReport =
  | { type: "created"; session: number }
  | { type: "response"; session: number; events: IEvent[]; headerRevision: bigint; fragments: number }
  | { type: "cancelled"; session: number; reason: string; compactRevision: bigint }
  | { type: "lost"; session: number; error: Error };

/** The committed state at one revision, with the mirror that matches it. */
interface Snapshot {
  revision: bigint;
  generation: string | undefined;
  state: SystemState | undefined;
  mirror: EntityMirror;
}

interface RevisionWaiter {
  revision: bigint;
  resolve(): void;
  reject(reason: unknown): void;
  removeAbortListener(): void;
}

/** Thrown when etcd no longer has a revision that the follower must read or watch from. */
class WatchHistoryLostError extends Error {
  override readonly name = "WatchHistoryLostError";
}

/** Snapshot reads at start that restart because a compaction removed their revision, before start fails. */
const maxStartAttempts = 5;

/** Delay before the first retry of a failed watch or read, in milliseconds. Each further retry doubles it, up to `maxRetryDelayMs`. */
const firstRetryDelayMs = 200;
const maxRetryDelayMs = 5000;

/**
 * Receive limit of the watch client, in bytes. With `fragment` set, etcd
 * splits a large watch response into messages of at most its
 * --max-request-bytes (1.5 MiB by default), or of one event when a single
 * event is larger. The grpc-js default of 4 MiB would reject the messages of
 * a server configured with a larger request limit.
 */
const watchMaxReceiveBytes = 64 * 1024 * 1024;

/**
 * Follows the state that the etcd connector stores under one prefix: it
 * reads the whole state once, then applies an etcd watch on the prefix, so a
 * change that any daemon commits reaches the handlers as entity events.
 *
 * A save appears in the watch as a put of `P/current` naming a new
 * generation. The follower then reads that generation at the put's revision
 * and compares it with its mirror, the encoded bytes of every entity the
 * handlers know, to emit one event per entity added, changed or removed.
 * Per-entity writes under the current generation become events directly.
 * Everything else under the prefix counts as progress only.
 *
 * The watch does not ask for previous values: the mirror already has them,
 * and the previous values of the thousands of keys that a save deletes would
 * only make its watch response larger.
 */
export class EtcdStateFollower {
  private state: FollowerState = "starting";
  private readonly logger: Logger;
  private readonly layout: SnapshotLayout;
  private readonly keys: FollowedKeyParser;
  private readonly reader: EtcdFollowReader;
  private readonly decoder: EntityDecoder;
  private readonly closeController = new AbortController();

  private lastRevision = 0n;
  /** Generation that `P/current` names, or undefined when it is missing or unreadable. */
  private generation: string | undefined;
  private mirror: EntityMirror = new Map();

  /** Number of the newest watch stream. Reports of older streams are dropped. */
  private session = 0;
  private stream: EtcdFollowStream | undefined;
  private sessionStartRevision = 0n;
  private readonly reports: StreamReport[] = [];
  private applying = false;
  /** Watch streams that failed since the last one etcd accepted. */
  private connectFailures = 0;
  private readonly waiters = new Set<RevisionWaiter>();

  private constructor(
    private readonly options: EtcdStateFollowerOptions,
    private readonly watchClient: Etcd3,
    logger: Logger,
    private readonly handlers: FollowerHandlers,
  ) {
    this.logger = logger.child({ component: "state-follower", prefix: options.prefix });
    this.layout = new SnapshotLayout(options.prefix);
    this.keys = new FollowedKeyParser(options.prefix);
    this.decoder = new EntityDecoder(this.logger);
    this.reader = new EtcdFollowReader(options.client, this.layout, this.keys, options.requestTimeoutMs, this.logger);
  }

  /**
   * Reads the committed state at the newest revision R0, calls
   * `onSnapshot(state, R0, false)`, and starts watching the prefix from
   * R0 + 1. Rejects with UNAVAILABLE when etcd cannot be read.
   */
  static async start(options: EtcdStateFollowerOptions, logger: Logger, handlers: FollowerHandlers): Promise<EtcdStateFollower> {
    checkOptions(options);
    // NOTE: the watch client gets no TLS or auth settings, like the connector's client. Both must change together.
    const watchClient = new Etcd3({
      hosts: options.endpoints,
      grpcOptions: { "grpc.max_receive_message_length": watchMaxReceiveBytes },
      defaultCallOptions: (context) => (context.isStream ? {} : { deadline: Date.now() + options.requestTimeoutMs }),
      // One attempt per call and no circuit breaker: the follower retries on its own schedule.
      faultHandling: { host: () => noop, global: noop },
    });
    const follower = new EtcdStateFollower(options, watchClient, logger, handlers);
    try {
      await follower.begin();
    } catch (error) {
      follower.shutDown();
      const reason = error instanceof Error ? error.message : String(error);
      throw unavailable(
        `cannot start following the state under "${options.prefix}/" in etcd at ${options.endpoints.join(",")}: ${reason}`,
        error,
      );
    }
    return follower;
  }

  /** The last revision fully processed: the handlers have heard of every change up to it. */
  get revision(): bigint {
    return this.lastRevision;
  }

  /**
   * Resolves once `revision` has been processed, so a caller that committed
   * at `revision` reads its own write from the handlers' view. Rejects with
   * the signal's reason on abort, and with UNAVAILABLE when the follower closes.
   */
  waitForRevision(revision: bigint, signal?: AbortSignal): Promise<void> {
    if (revision <= this.lastRevision) return Promise.resolve();
    if (this.state === "closed") return Promise.reject(this.closedError(revision));
    if (signal?.aborted) return Promise.reject(signal.reason);
    return new Promise<void>((resolve, reject) => {
      const onAbort = (): void => {
        this.waiters.delete(waiter);
        reject(signal?.reason);
      };
      const waiter: RevisionWaiter = {
        revision,
        resolve,
        reject,
        removeAbortListener: () => signal?.removeEventListener("abort", onAbort),
      };
      signal?.addEventListener("abort", onAbort, { once: true });
      this.waiters.add(waiter);
    });
  }

  /** Cancels the watch and rejects pending `waitForRevision` calls with UNAVAILABLE. Handlers are not called afterwards. */
  async close(): Promise<void> {
    if (this.state === "closed") return;
    this.shutDown();
    this.logger.info({ revision: this.lastRevision }, "state follower closed");
  }

  private shutDown(): void {
    this.transition("closed");
    this.closeController.abort();
    this.dropStream();
    this.reports.length = 0;
    for (const waiter of this.waiters) {
      waiter.removeAbortListener();
      waiter.reject(this.closedError(waiter.revision));
    }
    this.waiters.clear();
    this.watchClient.close();
  }

  private async begin(): Promise<void> {
    const startedAt = performance.now();
    let snapshot: Snapshot;
    for (let attempt = 1; ; attempt++) {
      try {
        snapshot = await this.readSnapshot();
        break;
      } catch (error) {
        // A compaction removed the revision the read started at, so read `current` again.
        if (error instanceof GRPCOutOfRangeError && attempt < maxStartAttempts) {
          this.logger.info({ attempt, err: error }, "snapshot revision compacted during the first read, reading again");
          continue;
        }
        throw error;
      }
    }
    this.adopt(snapshot);
    this.callHandler("onSnapshot", () => this.handlers.onSnapshot(snapshot.state, snapshot.revision, false));
    this.logger.info(
      {
        revision: snapshot.revision,
        generation: snapshot.generation,
        entities: snapshot.mirror.size,
        durationMs: Math.round(performance.now() - startedAt),
      },
      "state follower started",
    );
    this.connect();
  }

  // A method, so TypeScript does not narrow `state` across awaits.
  private isClosed(): boolean {
    return this.state === "closed";
  }

  private transition(next: FollowerState): void {
    if (!allowedTransitions[this.state].includes(next)) {
      throw new Error(`state follower cannot change from ${this.state} to ${next}`);
    }
    this.state = next;
  }

  /** Opens a watch stream that starts right after the last processed revision. */
  private connect(): void {
    this.transition("connecting");
    const session = ++this.session;
    const startRevision = this.lastRevision + 1n;
    this.sessionStartRevision = startRevision;
    const listener: FollowStreamListener = {
      created: () => this.enqueue({ type: "created", session }),
      response: (events, headerRevision, fragments) =>
        this.enqueue({ type: "response", session, events, headerRevision, fragments }),
      cancelled: (reason, compactRevision) => this.enqueue({ type: "cancelled", session, reason, compactRevision }),
      lost: (error) => this.enqueue({ type: "lost", session, error }),
    };
    EtcdFollowStream.open(this.watchClient, this.watchRequest(startRevision), listener).then(
      (stream) => {
        if (session === this.session) this.stream = stream;
        else stream.close();
      },
      (error: unknown) => listener.lost(error instanceof Error ? error : new Error(String(error))),
    );
  }

  private watchRequest(startRevision: bigint): IWatchCreateRequest {
    const key = Buffer.from(`${this.options.prefix}/`);
    return {
      key,
      range_end: prefixRangeEnd(key),
      start_revision: startRevision.toString(),
      // Periodic progress notifications move the revision forward while nothing under the prefix changes.
      progress_notify: true,
      fragment: true,
    };
  }

  /** Closes the current stream and makes the reports still queued from it stale. */
  private dropStream(): void {
    this.session++;
    this.stream?.close();
    this.stream = undefined;
  }

  private enqueue(report: StreamReport): void {
    if (report.session !== this.session) return;
    this.reports.push(report);
    void this.applyReports();
  }

  /** Handles queued reports one at a time, so a save's generation read holds back the reports behind it. */
  private async applyReports(): Promise<void> {
    if (this.applying) return;
    this.applying = true;
    try {
      for (let report = this.reports.shift(); report !== undefined; report = this.reports.shift()) {
        if (this.isClosed()) return;
        if (report.session !== this.session) continue;
        await this.handleReport(report);
      }
    } finally {
      this.applying = false;
    }
  }

  private async handleReport(report: StreamReport): Promise<void> {
    try {
      switch (report.type) {
        case "created":
          await this.handleCreated(report.session);
          return;
        case "response":
          await this.applyResponse(report);
          return;
        case "cancelled":
          await this.resync(
            report.compactRevision > 0n
              ? `etcd compacted the watch history up to revision ${report.compactRevision}`
              : `etcd cancelled the watch: ${report.reason || "no reason given"}`,
          );
          return;
        case "lost":
          await this.reconnect(report.error);
          return;
      }
    } catch (error) {
      if (this.isClosed()) return;
      if (error instanceof WatchHistoryLostError) {
        await this.resync(error.message);
        return;
      }
      // Nothing else is expected here. A fresh snapshot is the one state the follower can trust after it.
      this.logger.warn({ err: error, revision: this.lastRevision }, "state follower failed to apply a watch report");
      await this.resync(`applying a watch report failed: ${error instanceof Error ? error.message : String(error)}`);
    }
  }

  /**
   * Confirms that etcd still keeps the revision before the watch's start.
   * etcd 3.4 accepts a watch that starts exactly at the compaction revision,
   * but the compaction removed that revision's deletions, so the watch would
   * never report them. A range at start - 1 fails in exactly that case.
   * NOTE: a compaction to exactly the start revision between this check and
   * etcd's first catch-up read of the watch would still go unnoticed.
   */
  private async handleCreated(session: number): Promise<void> {
    const startRevision = this.sessionStartRevision;
    let retained: boolean;
    try {
      retained = await this.reader.isRevisionRetained(startRevision - 1n);
    } catch (error) {
      if (session === this.session) await this.reconnect(error instanceof Error ? error : new Error(String(error)));
      return;
    }
    if (session !== this.session) return;
    if (!retained) {
      throw new WatchHistoryLostError(`etcd compacted revision ${startRevision - 1n} before the watch from ${startRevision} started`);
    }
    this.transition("watching");
    if (this.connectFailures > 0) {
      this.logger.info({ revision: this.lastRevision, failures: this.connectFailures }, "state follower watches etcd again");
    }
    this.connectFailures = 0;
  }

  /** Opens a new watch from the next revision after a delay. No history is lost, so no snapshot is read. */
  private async reconnect(error: Error): Promise<void> {
    if (this.isClosed()) return;
    this.dropStream();
    this.transition("reconnecting");
    if (this.connectFailures === 0) {
      this.logger.warn({ err: error, revision: this.lastRevision }, "state follower lost its etcd watch, watching again");
    } else {
      this.logger.debug({ err: error, failures: this.connectFailures }, "state follower cannot watch etcd yet");
    }
    if (!(await this.pause(this.connectFailures++))) return;
    this.connect();
  }

  /** Reads the whole state at a new revision, hands it to `onSnapshot` as a resync, and watches from there. */
  private async resync(reason: string): Promise<void> {
    if (this.isClosed()) return;
    this.dropStream();
    this.transition("resyncing");
    this.logger.warn({ reason, revision: this.lastRevision }, "state follower lost watch history, reading the whole state again");
    const startedAt = performance.now();
    let snapshot: Snapshot | undefined;
    for (let failures = 0; snapshot === undefined; failures++) {
      try {
        snapshot = await this.readSnapshot();
      } catch (error) {
        if (this.isClosed()) return;
        if (failures === 0) this.logger.warn({ err: error }, "cannot read the whole state from etcd, retrying");
        if (!(await this.pause(failures))) return;
      }
    }
    if (this.isClosed()) return;

    const previousRevision = this.lastRevision;
    this.adopt(snapshot);
    const { state, revision } = snapshot;
    this.callHandler("onSnapshot", () => this.handlers.onSnapshot(state, revision, true));
    this.logger.info(
      {
        revision,
        previousRevision,
        generation: snapshot.generation,
        entities: snapshot.mirror.size,
        durationMs: Math.round(performance.now() - startedAt),
      },
      "state follower read the whole state again",
    );
    this.connect();
  }

  /** Waits before retry number `failures` + 1. Returns false when the follower closed meanwhile. */
  private async pause(failures: number): Promise<boolean> {
    const delayMs = Math.min(firstRetryDelayMs * 2 ** Math.min(failures, 16), maxRetryDelayMs);
    try {
      await sleep(delayMs, undefined, { signal: this.closeController.signal });
      return true;
    } catch {
      return false;
    }
  }

  /**
   * Applies one watch response. A response without events is a progress
   * notification, and its header revision is the progress. A response with
   * events counts only up to its last event. The reason is that etcd 3.4
   * sends a watch that catches up (syncWatchers in mvcc/watchable_store.go)
   * at most 1000 revisions per response, with the store's current revision
   * in the header. So that header can be ahead of events still to come.
   */
  private async applyResponse(report: Extract<StreamReport, { type: "response" }>): Promise<void> {
    const before = this.lastRevision;
    if (report.fragments > 1) {
      this.logger.debug({ fragments: report.fragments, events: report.events.length }, "joined the fragments of a watch response");
    }
    if (report.events.length === 0) {
      if (report.headerRevision > this.lastRevision) this.advance(report.headerRevision);
    }
    for (const group of groupByRevision(report.events)) {
      // etcd starts each watch after the last processed revision, so this only skips repeats. A revision
      // equal to the last one is applied again, so that a revision split across responses loses nothing.
      if (group.revision < this.lastRevision) continue;
      const events = await this.applyRevision(group.revision, group.events);
      if (report.session !== this.session) return;
      if (events.length > 0) this.callHandler("onEvents", () => this.handlers.onEvents(events, group.revision));
      this.advance(group.revision);
    }
    if (this.lastRevision > before) {
      const revision = this.lastRevision;
      this.callHandler("onProgress", () => this.handlers.onProgress?.(revision));
    }
  }

  private async applyRevision(revision: bigint, events: IEvent[]): Promise<EntityEvent[]> {
    const parsed = events.map((event) => ({ event, key: this.keys.parse(event.kv.key) }));
    // A save puts `current` and deletes the generation it replaces in one transaction. The pointer goes
    // first, and the generation read at this revision covers every other entity key of the revision.
    const pointer = parsed.find((entry) => entry.key.type === "current");
    if (pointer !== undefined) return await this.applyPointer(pointer.event, revision);
    return this.applyEntityChanges(parsed, revision);
  }

  /** Turns puts and deletes of entity keys under the current generation into events, and updates the mirror. */
  private applyEntityChanges(parsed: Array<{ event: IEvent; key: FollowedKey }>, revision: bigint): EntityEvent[] {
    const events: EntityEvent[] = [];
    for (const { event, key } of parsed) {
      // Keys of another generation belong to a save still being written, or to the one a save replaced.
      if (key.type !== "entity" || key.generation !== this.generation) continue;
      if (event.type === "Delete") {
        // A value that could never be decoded was never in the mirror, and the handlers never heard of it.
        if (this.mirror.delete(entityKey(key.kind, key.id))) events.push({ revision, kind: key.kind, id: key.id, value: undefined });
        continue;
      }
      const value = this.decoder.decode(key.kind, event.kv.value, event.kv.key.toString("utf8"));
      if (value === undefined) continue;
      mirrorPut(this.mirror, key.kind, key.id, event.kv.value);
      events.push({ revision, kind: key.kind, id: key.id, value });
    }
    this.decoder.endBatch();
    return events;
  }

  /** Applies a put or delete of `P/current`: reads the generation it names and compares it with the mirror. */
  private async applyPointer(event: IEvent, revision: bigint): Promise<EntityEvent[]> {
    const key = event.kv.key.toString("utf8");
    if (event.type === "Delete") {
      this.logger.warn({ key, revision, generation: this.generation }, "current pointer deleted from etcd, removing every entity");
      const events = removalEvents(this.mirror, revision);
      this.mirror = new Map();
      this.generation = undefined;
      return events;
    }

    const pointer = this.parsePointer(event.kv.value, key);
    const generation = pointer?.generation;
    if (generation === undefined) {
      // The mirror stays as the handlers know it, and the next readable pointer is compared with it.
      this.generation = undefined;
      return [];
    }
    const startedAt = performance.now();
    const { mirror, events } = await this.readGenerationDiff(generation, revision);
    const previous = this.generation;
    this.mirror = mirror;
    this.generation = generation;
    this.callHandler("onTimestamp", () => this.handlers.onTimestamp?.(pointer?.timestamp, revision));
    this.logger.info(
      {
        revision,
        generation,
        previous,
        entities: mirror.size,
        changes: events.length,
        durationMs: Math.round(performance.now() - startedAt),
      },
      "state follower applied a save",
    );
    return events;
  }

  /** Reads `generation` at `revision` and compares it with the mirror, retrying reads that fail while the revision is kept. */
  private async readGenerationDiff(generation: string, revision: bigint): Promise<ReturnType<GenerationDiff["finish"]>> {
    for (let failures = 0; ; failures++) {
      const diff = new GenerationDiff(this.mirror, revision, this.decoder);
      try {
        for await (const entries of this.reader.readGeneration(generation, revision, this.closeController.signal)) {
          for (const entry of entries) diff.add(entry);
        }
        return diff.finish();
      } catch (error) {
        this.decoder.endBatch();
        if (error instanceof GRPCOutOfRangeError) {
          throw new WatchHistoryLostError(
            `etcd compacted revision ${revision}, where generation ${generation} became current, before the follower read it`,
          );
        }
        if (this.isClosed()) throw error;
        if (failures === 0) {
          this.logger.warn({ err: error, generation, revision }, "cannot read a saved generation from etcd, retrying");
        }
        if (!(await this.pause(failures))) throw error;
      }
    }
  }

  /** Reads `current` and the generation it names at one revision. */
  private async readSnapshot(): Promise<Snapshot> {
    const { revision, value } = await this.reader.readCurrent();
    const empty: Snapshot = { revision, generation: undefined, state: undefined, mirror: new Map() };
    if (value === undefined) return empty;
    const pointer = this.parsePointer(value, this.layout.currentKey.toString("utf8"));
    if (pointer === undefined) return empty;

    const builder = new SnapshotBuilder(pointer.timestamp, this.decoder);
    try {
      for await (const entries of this.reader.readGeneration(pointer.generation, revision, this.closeController.signal)) {
        for (const entry of entries) builder.add(entry);
      }
    } catch (error) {
      this.decoder.endBatch();
      throw error;
    }
    return { revision, generation: pointer.generation, ...builder.finish() };
  }

  /** Parses a value of `P/current`, or logs why it cannot and returns undefined. */
  private parsePointer(value: Buffer, key: string): ReturnType<typeof parseCurrentPointer> | undefined {
    try {
      return parseCurrentPointer(value, key);
    } catch (error) {
      this.logger.warn({ err: error, key }, "cannot parse the current pointer, ignoring entity keys until the next save");
      return undefined;
    }
  }

  private adopt(snapshot: Snapshot): void {
    this.mirror = snapshot.mirror;
    this.generation = snapshot.generation;
    this.advance(snapshot.revision);
  }

  /** Records `revision` as processed and resolves the waits it satisfies. */
  private advance(revision: bigint): void {
    this.lastRevision = revision;
    for (const waiter of this.waiters) {
      if (waiter.revision > revision) continue;
      this.waiters.delete(waiter);
      waiter.removeAbortListener();
      waiter.resolve();
    }
  }

  /** Calls a handler unless the follower closed. A handler that throws is logged, and the follower goes on. */
  private callHandler(name: keyof FollowerHandlers, call: () => void): void {
    if (this.isClosed()) return;
    try {
      call();
    } catch (error) {
      this.logger.warn({ err: error, handler: name, revision: this.lastRevision }, "state follower handler threw");
    }
  }

  private closedError(revision: bigint): Error {
    return unavailable(
      `cannot wait for etcd revision ${revision}: the state follower of prefix "${this.options.prefix}" was closed`,
    );
  }
}

/** Splits the events of a watch response into runs of one revision each, in the order etcd sent them. */
function groupByRevision(events: IEvent[]): Array<{ revision: bigint; events: IEvent[] }> {
  const groups: Array<{ revision: bigint; events: IEvent[] }> = [];
  for (const event of events) {
    // A delete event's mod_revision is the revision of the delete.
    const revision = BigInt(event.kv.mod_revision);
    const last = groups.at(-1);
    if (last?.revision === revision) last.events.push(event);
    else groups.push({ revision, events: [event] });
  }
  return groups;
}

function checkOptions(options: EtcdStateFollowerOptions): void {
  if (options.endpoints.length === 0) {
    throw new Error("cannot start the state follower: no etcd endpoints are configured");
  }
  if (options.prefix === "" || options.prefix.endsWith("/")) {
    throw new Error(`cannot start the state follower: prefix "${options.prefix}" must be non-empty and not end with "/"`);
  }
  if (!(options.requestTimeoutMs > 0)) {
    throw new Error(`cannot start the state follower: requestTimeoutMs must be positive, got ${options.requestTimeoutMs}`);
  }
}
