import type { StateManagerService } from "../gen/modelmesh/state/v1/state_manager_service_pb.js";
import type { StateManager } from "../state/state-manager.js";
import { validateState } from "../state/validate-state.js";
import type { ImplementationOf } from "./grpc-adapter.js";
import { invalidArgument } from "./service-error.js";

export interface StateManagerServiceOptions {
  manager: StateManager;
  /** Most models, providers and pools that one saved state may hold in all. */
  maxStateEntities: number;
}

/** Handlers of modelmesh.state.v1.StateManagerService over one StateManager. */
export function stateManagerService(
  options: StateManagerServiceOptions,
): ImplementationOf<typeof StateManagerService> {
  const { manager, maxStateEntities } = options;
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
      await manager.save(request.state);
      return { status: manager.status() };
    },

    sync: async () => {
      await manager.sync();
      return { status: manager.status() };
    },

    getSyncStatus: async () => ({ status: manager.status() }),
  };
}
