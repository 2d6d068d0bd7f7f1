import { create, equals, type MessageInitShape } from "@bufbuild/protobuf";
import { EntityChangeSchema, EntityKind, type EntityChange } from "../gen/modelmesh/state/v1/changes_pb.js";
import {
  ModelStateSchema,
  PoolStateSchema,
  ProviderStateSchema,
  SystemStateSchema,
  type ModelState,
  type PoolState,
  type ProviderState,
  type SystemState,
} from "../gen/modelmesh/state/v1/state_pb.js";
import type { EntityEvent, EntityValue } from "./entity.js";

const entityKinds = [EntityKind.MODEL, EntityKind.PROVIDER, EntityKind.POOL] as const;

/** Returns the map of `state` that contains the entities of `kind`. */
export function entityMap(state: SystemState, kind: EntityKind): Record<string, EntityValue> {
  switch (kind) {
    case EntityKind.MODEL:
      return state.models;
    case EntityKind.PROVIDER:
      return state.providers;
    case EntityKind.POOL:
      return state.pools;
    default:
      throw new Error(`cannot find the entities of unknown kind ${kind}`);
  }
}

/** Compares two values of one kind field by field. */
export function sameEntityValue(kind: EntityKind, a: EntityValue | undefined, b: EntityValue | undefined): boolean {
  if (a === undefined || b === undefined) return a === b;
  switch (kind) {
    case EntityKind.MODEL:
      return equals(ModelStateSchema, a as ModelState, b as ModelState);
    case EntityKind.PROVIDER:
      return equals(ProviderStateSchema, a as ProviderState, b as ProviderState);
    default:
      return equals(PoolStateSchema, a as PoolState, b as PoolState);
  }
}

/** Lists the entity changes that turn `before` into `after`, all at `revision`. */
export function diffStates(before: SystemState | undefined, after: SystemState | undefined, revision: bigint): EntityEvent[] {
  const events: EntityEvent[] = [];
  for (const kind of entityKinds) {
    const old = before === undefined ? {} : entityMap(before, kind);
    const updated = after === undefined ? {} : entityMap(after, kind);
    for (const [id, value] of Object.entries(updated)) {
      if (!sameEntityValue(kind, old[id], value)) events.push({ revision, kind, id, value });
    }
    for (const id of Object.keys(old)) {
      if (!(id in updated)) events.push({ revision, kind, id, value: undefined });
    }
  }
  return events;
}

/**
 * Applies `events` to the maps of `state` in place. Entity objects are
 * replaced, never changed, so a shallow copy taken earlier stays as it was.
 */
export function applyEventsInPlace(state: SystemState, events: EntityEvent[]): void {
  for (const event of events) {
    const map = entityMap(state, event.kind);
    if (event.value === undefined) delete map[event.id];
    else map[event.id] = event.value;
  }
}

/** Copies the maps of a state but shares its entity objects, for a reader that outlives later changes. */
export function shallowCopy(state: SystemState): SystemState {
  return create(SystemStateSchema, {
    models: { ...state.models },
    providers: { ...state.providers },
    pools: { ...state.pools },
    timestamp: state.timestamp,
  });
}

/** Converts an event into the EntityChange message that UpdateState and WatchState send. */
export function toEntityChange(event: EntityEvent): EntityChange {
  const init: MessageInitShape<typeof EntityChangeSchema> = { kind: event.kind, id: event.id, revision: event.revision };
  if (event.value === undefined) {
    init.value = { case: "removed", value: true };
  } else if (event.kind === EntityKind.MODEL) {
    init.value = { case: "model", value: event.value as ModelState };
  } else if (event.kind === EntityKind.PROVIDER) {
    init.value = { case: "provider", value: event.value as ProviderState };
  } else {
    init.value = { case: "pool", value: event.value as PoolState };
  }
  return create(EntityChangeSchema, init);
}

/** Counts the models, providers and pools of a state. */
export function countEntities(state: SystemState | undefined): number {
  if (state === undefined) return 0;
  return Object.keys(state.models).length + Object.keys(state.providers).length + Object.keys(state.pools).length;
}
