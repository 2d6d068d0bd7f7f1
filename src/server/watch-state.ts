import type { WatchStateRequest, WatchStateResponseSchema } from "../gen/modelmesh/state/v1/state_manager_service_pb.js";
import { EntityKind } from "../gen/modelmesh/state/v1/changes_pb.js";
import type { EntityEvent } from "../state/entity.js";
import { entityPages } from "../state/entity-pages.js";
import { toEntityChange } from "../state/entity-events.js";
import type { StateManager } from "../state/state-manager.js";
import { validateId } from "../state/validate-state.js";
import type { CallContext } from "./call-context.js";
import type { SendMessage } from "./grpc-adapter.js";
import { invalidArgument } from "./service-error.js";

/** Most events read from the change log for one message. */
const eventsPerMessage = 500;

export interface WatchStateOptions {
  /** Time after which a quiet stream gets a progress message. */
  progressIntervalMs: number;
}

type Send = SendMessage<typeof WatchStateResponseSchema>;

/**
 * Streams the committed changes of the state. The stream starts with a
 * snapshot, or resumes after `start_after_revision` with no gap and no
 * repeat. When that revision is no longer available, it sends a snapshot
 * marked as a resync instead, and continues after it. A stream keeps only a
 * cursor into the daemon's shared change log.
 */
export async function streamStateChanges(
  manager: StateManager,
  request: WatchStateRequest,
  context: CallContext,
  send: Send,
  options: WatchStateOptions,
): Promise<void> {
  const include = watchFilter(request);
  const store = manager.stateStore;
  const log = store.changeLog;
  const { signal } = context;

  let wake: (() => void) | undefined;
  const unsubscribe = log.subscribe(() => wake?.());
  const onAbort = (): void => wake?.();
  signal.addEventListener("abort", onAbort);
  try {
    const start = request.startAfterRevision;
    let cursor: bigint;
    if (start === 0n) cursor = await sendSnapshot(manager, include, send, false);
    else if (await store.isResumable(start, signal)) cursor = start;
    else cursor = await sendSnapshot(manager, include, send, true);

    let lastSentAt = Date.now();
    while (!signal.aborted) {
      const read = log.readAfter(cursor, eventsPerMessage);
      if (read.kind === "too-old") {
        context.logger.info({ cursor, oldestRevision: read.oldestRevision }, "watch fell behind the change log; resyncing");
        cursor = await sendSnapshot(manager, include, send, true);
        lastSentAt = Date.now();
        continue;
      }
      if (read.revision > cursor) {
        const changes = read.events.filter((event) => include(event.kind, event.id));
        cursor = read.revision;
        if (changes.length > 0) {
          await send({ revision: cursor, changes: changes.map(toEntityChange) });
          lastSentAt = Date.now();
        }
        continue;
      }
      const waitMs = lastSentAt + options.progressIntervalMs - Date.now();
      if (waitMs <= 0) {
        await send({ revision: cursor });
        lastSentAt = Date.now();
        continue;
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, waitMs);
        wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      wake = undefined;
    }
    throw signal.reason;
  } finally {
    signal.removeEventListener("abort", onAbort);
    unsubscribe();
  }
}

/** Sends the committed state in pages marked as a snapshot, and returns its revision. */
async function sendSnapshot(
  manager: StateManager,
  include: (kind: EntityKind, id: string) => boolean,
  send: Send,
  resync: boolean,
): Promise<bigint> {
  const { state, revision } = manager.stateStore.committed();
  const pages = state === undefined ? [] : [...entityPages(state, include)];
  if (pages.length === 0) {
    await send({ revision, snapshot: { resync, last: true } });
    return revision;
  }
  for (const [index, page] of pages.entries()) {
    const events: EntityEvent[] = page.map((entity) => ({ ...entity, revision }));
    await send({ revision, changes: events.map(toEntityChange), snapshot: { resync, last: index === pages.length - 1 } });
  }
  return revision;
}

function watchFilter(request: WatchStateRequest): (kind: EntityKind, id: string) => boolean {
  request.kinds.forEach((kind, index) => {
    if (kind === EntityKind.UNSPECIFIED || typeof EntityKind[kind] !== "string") {
      throw invalidArgument(`invalid WatchStateRequest.kinds[${index}]: unknown entity kind ${kind}`);
    }
  });
  request.ids.forEach((id, index) => validateId(id, `WatchStateRequest.ids[${index}]`));
  if (request.startAfterRevision < 0n) {
    throw invalidArgument(`invalid WatchStateRequest.start_after_revision: ${request.startAfterRevision} is negative`);
  }
  const kinds = new Set(request.kinds);
  const ids = new Set(request.ids);
  return (kind, id) => (kinds.size === 0 || kinds.has(kind)) && (ids.size === 0 || ids.has(id));
}
