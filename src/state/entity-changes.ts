import { clone, create, isMessage } from "@bufbuild/protobuf";
import {
  EntityKind,
  ModelChangeSchema,
  PoolChangeSchema,
  ProviderChangeSchema,
} from "../gen/modelmesh/state/v1/changes_pb.js";
import type { UpdateStateRequest } from "../gen/modelmesh/state/v1/state_manager_service_pb.js";
import { ModelStateSchema, PoolStateSchema, ProviderStateSchema } from "../gen/modelmesh/state/v1/state_pb.js";
import { entityLabelOf, schemasOfKind } from "./apply-entity-change.js";
import type { AnyEntityChange, EntityValue } from "./entity.js";

export { applyEntityChange } from "./apply-entity-change.js";
export { entityValueEquals, mergeEntityChanges } from "./merge-entity.js";
export { maxIdempotencyKeyBytes, validateUpdateRequest } from "./validate-changes.js";

/** Returns the changes of a request tagged with their kind: models, then providers, then pools, each in request order. */
export function changesOfRequest(request: UpdateStateRequest): AnyEntityChange[] {
  return [
    ...request.models.map((change): AnyEntityChange => ({ kind: EntityKind.MODEL, change })),
    ...request.providers.map((change): AnyEntityChange => ({ kind: EntityKind.PROVIDER, change })),
    ...request.pools.map((change): AnyEntityChange => ({ kind: EntityKind.POOL, change })),
  ];
}

/**
 * Returns a change that replaces every field of an entity with those of
 * `value`, so that a whole-state Save can be written as per-entity changes.
 * The change contains a copy of `value`. Throws when `value` is not a message of `kind`.
 */
export function replaceEntityChange(kind: EntityKind, id: string, value: EntityValue): AnyEntityChange {
  const setFields = { paths: schemasOfKind(kind).state.fields.map((field) => field.name) };
  switch (kind) {
    case EntityKind.MODEL:
      if (isMessage(value, ModelStateSchema)) {
        return { kind, change: create(ModelChangeSchema, { id, set: clone(ModelStateSchema, value), setFields }) };
      }
      break;
    case EntityKind.PROVIDER:
      if (isMessage(value, ProviderStateSchema)) {
        return { kind, change: create(ProviderChangeSchema, { id, set: clone(ProviderStateSchema, value), setFields }) };
      }
      break;
    case EntityKind.POOL:
      if (isMessage(value, PoolStateSchema)) {
        return { kind, change: create(PoolChangeSchema, { id, set: clone(PoolStateSchema, value), setFields }) };
      }
      break;
  }
  throw new Error(`cannot replace ${entityLabelOf(kind, id)}: the value is a ${value.$typeName}`);
}

/** Returns a change that removes an entity. */
export function removeEntityChange(kind: EntityKind, id: string): AnyEntityChange {
  switch (kind) {
    case EntityKind.MODEL:
      return { kind, change: create(ModelChangeSchema, { id, remove: true }) };
    case EntityKind.PROVIDER:
      return { kind, change: create(ProviderChangeSchema, { id, remove: true }) };
    case EntityKind.POOL:
      return { kind, change: create(PoolChangeSchema, { id, remove: true }) };
    default:
      throw new Error(`cannot remove ${entityLabelOf(kind, id)}: expected kind model, provider or pool`);
  }
}
