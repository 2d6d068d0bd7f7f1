import type { StateManagerService } from "../gen/modelmesh/state/v1/state_manager_service_pb.js";
import type { LockService } from "../locks/lock-service.js";
import type { StateManager } from "../state/state-manager.js";
import type { SyncStatusFeed } from "../state/sync-status-feed.js";
import { validateState } from "../state/validate-state.js";
import type { ImplementationOf } from "./grpc-adapter.js";
import { lockHandlers, lockName, type LockSettings } from "./lock-handlers.js";
import { invalidArgument } from "./service-error.js";
import { streamSyncStatus } from "./watch-sync-status.js";

export interface StateManagerServiceOptions {
  manager: StateManager;
  statusFeed: SyncStatusFeed;
  locks: LockService;
  lockSettings: LockSettings;
  /** Most models, providers and pools that one saved state may hold in all. */
  maxStateEntities: number;
}

/** Handlers of modelmesh.state.v1.StateManagerService. */
export function stateManagerService(options: StateManagerServiceOptions): ImplementationOf<typeof StateManagerService> {
  const { manager, statusFeed, locks, maxStateEntities } = options;
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
      const fence =
        request.fence === undefined
          ? undefined
          : await locks.checkFence(lockName(request.fence.lockName, "SaveRequest.fence.lock_name"), request.fence.token);
      await manager.save(request.state, fence);
      return { status: statusFeed.current() };
    },

    sync: async () => {
      await manager.sync();
      return { status: statusFeed.current() };
    },

    getSyncStatus: async () => ({ status: statusFeed.current() }),

    watchSyncStatus: async (_request, context, send) => await streamSyncStatus(statusFeed, context, send),

    ...lockHandlers(locks, options.lockSettings),
  };
}
