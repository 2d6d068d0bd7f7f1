import { createHash } from "node:crypto";
import { create, toBinary } from "@bufbuild/protobuf";
import type { Fence } from "../gen/modelmesh/state/v1/lock_pb.js";
import {
  UpdateStateRequestSchema,
  type StateManagerService,
  type UpdateStateRequest,
} from "../gen/modelmesh/state/v1/state_manager_service_pb.js";
import { SystemStateSchema } from "../gen/modelmesh/state/v1/state_pb.js";
import { entityMap } from "../state/entity-events.js";
import type { LockService } from "../locks/lock-service.js";
import type { StateManager } from "../state/state-manager.js";
import type { SyncStatusFeed } from "../state/sync-status-feed.js";
import { validateUpdateRequest } from "../state/entity-changes.js";
import { entityPages } from "../state/entity-pages.js";
import { validateState } from "../state/validate-state.js";
import type { ImplementationOf } from "./grpc-adapter.js";
import { lockHandlers, lockName, type LockSettings } from "./lock-handlers.js";
import { invalidArgument } from "./service-error.js";
import { streamStateChanges } from "./watch-state.js";
import { streamSyncStatus } from "./watch-sync-status.js";

export interface StateManagerServiceOptions {
  manager: StateManager;
  statusFeed: SyncStatusFeed;
  locks: LockService;
  lockSettings: LockSettings;
  /** Maximum number of models, providers and pools in one saved state, all kinds together. */
  maxStateEntities: number;
  /** Maximum number of entity changes in one UpdateState request. */
  maxUpdateChanges: number;
  /** Time after which a quiet WatchState stream gets a progress message. */
  watchProgressIntervalMs: number;
}

/**
 * Binds an idempotency key to the content of its request, so that a retry is
 * recognised only when it repeats the request exactly. A request that reuses
 * a key with other content is applied as a new request, instead of receiving
 * the response of another request.
 */
function contentBoundKey(request: UpdateStateRequest): string {
  if (request.idempotencyKey === "") return "";
  const content = toBinary(UpdateStateRequestSchema, { ...request, idempotencyKey: "" });
  return `${request.idempotencyKey}#${createHash("sha256").update(content).digest("hex")}`;
}

/** Handlers of modelmesh.state.v1.StateManagerService. */
export function stateManagerService(options: StateManagerServiceOptions): ImplementationOf<typeof StateManagerService> {
  const { manager, statusFeed, locks, maxStateEntities } = options;
  const checkFence = async (fence: Fence | undefined, path: string) =>
    fence === undefined ? undefined : await locks.checkFence(lockName(fence.lockName, `${path}.lock_name`), fence.token);

  return {
    load: async () => {
      const state = manager.current();
      return state === undefined ? {} : { state };
    },

    save: async (request) => {
      if (request.state === undefined) {
        throw invalidArgument("invalid SaveRequest: state is required; send an empty SystemState to clear the state");
      }
      validateState(request.state, maxStateEntities);
      await manager.save(request.state, await checkFence(request.fence, "SaveRequest.fence"));
      return { status: statusFeed.current() };
    },

    sync: async () => {
      await manager.sync();
      return { status: statusFeed.current() };
    },

    getSyncStatus: async () => ({ status: statusFeed.current() }),

    updateState: async (request) => {
      validateUpdateRequest(request, options.maxUpdateChanges);
      const fence = await checkFence(request.fence, "UpdateStateRequest.fence");
      return await manager.update({ ...request, idempotencyKey: contentBoundKey(request) }, fence);
    },

    watchState: async (request, context, send) =>
      await streamStateChanges(manager, request, context, send, { progressIntervalMs: options.watchProgressIntervalMs }),

    loadStream: async (_request, context, send) => {
      const state = manager.current();
      if (state === undefined) return;
      const revision = manager.stateStore.committed().revision;
      let first = true;
      for (const page of entityPages(state)) {
        context.signal.throwIfAborted();
        const part = create(SystemStateSchema, { timestamp: first ? state.timestamp : undefined });
        for (const entity of page) entityMap(part, entity.kind)[entity.id] = entity.value;
        await send({ part, revision });
        first = false;
      }
      if (first) await send({ part: { timestamp: state.timestamp }, revision });
    },

    watchSyncStatus: async (_request, context, send) => await streamSyncStatus(statusFeed, context, send),

    ...lockHandlers(locks, options.lockSettings),
  };
}
