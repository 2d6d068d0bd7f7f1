import { create } from "@bufbuild/protobuf";
import type { EntityKind } from "../gen/modelmesh/state/v1/changes_pb.js";
import { UpdateStateResponseSchema, type UpdateStateResponse } from "../gen/modelmesh/state/v1/state_manager_service_pb.js";
import { type AnyEntityChange, type EntityEvent, type EntityValue, entityKey, entityKindName } from "./entity.js";
import { applyEntityChange } from "./entity-changes.js";
import { toEntityChange } from "./entity-events.js";

/** The outcome of a request's changes for one entity. */
export interface EntityUpdate {
  kind: EntityKind;
  id: string;
  /** The request's changes of this entity, in request order. */
  changes: AnyEntityChange[];
  /** The value after the changes, or undefined when they removed the entity. */
  value: EntityValue | undefined;
}

/** Groups a request's changes by entity, in order of first appearance. */
export function groupByEntity(changes: AnyEntityChange[]): Array<Omit<EntityUpdate, "value">> {
  const groups = new Map<string, Omit<EntityUpdate, "value">>();
  for (const entry of changes) {
    const key = entityKey(entry.kind, entry.change.id);
    let group = groups.get(key);
    if (group === undefined) {
      group = { kind: entry.kind, id: entry.change.id, changes: [] };
      groups.set(key, group);
    }
    group.changes.push(entry);
  }
  return [...groups.values()];
}

/** Applies `changes` in order to the entity value `stored`. Throws FAILED_PRECONDITION as applyEntityChange does. */
export function applyChanges(
  kind: EntityKind,
  id: string,
  stored: EntityValue | undefined,
  changes: AnyEntityChange[],
): EntityValue | undefined {
  const label = `${entityKindName(kind)} ${JSON.stringify(id)}`;
  return changes.reduce<EntityValue | undefined>((value, change) => applyEntityChange(change, value, label), stored);
}

/**
 * Computes every entity's new value from the values `lookup` returns. Throws
 * before returning anything if one change cannot apply, so a request is
 * applied whole or not at all.
 */
export function computeUpdate(
  changes: AnyEntityChange[],
  lookup: (kind: EntityKind, id: string) => EntityValue | undefined,
): EntityUpdate[] {
  return groupByEntity(changes).map((group) => ({
    ...group,
    value: applyChanges(group.kind, group.id, lookup(group.kind, group.id), group.changes),
  }));
}

/** Builds the UpdateState response for entity updates that took effect at `revision`. */
export function updateResponse(revision: bigint, updates: Array<Pick<EntityUpdate, "kind" | "id" | "value">>): UpdateStateResponse {
  return create(UpdateStateResponseSchema, {
    revision,
    replayed: false,
    changes: updates.map((update) => toEntityChange(eventOf(update, revision))),
  });
}

/** Turns an entity update into the event that records it at `revision`. */
export function eventOf(update: Pick<EntityUpdate, "kind" | "id" | "value">, revision: bigint): EntityEvent {
  return { revision, kind: update.kind, id: update.id, value: update.value };
}
