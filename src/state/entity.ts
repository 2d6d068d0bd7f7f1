import {
  EntityKind,
  type ModelChange,
  type PoolChange,
  type ProviderChange,
} from "../gen/modelmesh/state/v1/changes_pb.js";
import type { ModelState, PoolState, ProviderState } from "../gen/modelmesh/state/v1/state_pb.js";

/** The state of one model, provider or pool. */
export type EntityValue = ModelState | ProviderState | PoolState;

/** A change request for one entity, tagged with its kind. */
export type AnyEntityChange =
  | { kind: EntityKind.MODEL; change: ModelChange }
  | { kind: EntityKind.PROVIDER; change: ProviderChange }
  | { kind: EntityKind.POOL; change: PoolChange };

/** One committed change of one entity: its new value, or undefined when it was removed. */
export interface EntityEvent {
  revision: bigint;
  kind: EntityKind;
  id: string;
  value: EntityValue | undefined;
}

/** Returns the key that identifies an entity among all kinds, such as "model/gpt-4o". */
export function entityKey(kind: EntityKind, id: string): string {
  return `${entityKindName(kind)}/${id}`;
}

/** Returns "model", "provider" or "pool". */
export function entityKindName(kind: EntityKind): string {
  switch (kind) {
    case EntityKind.MODEL:
      return "model";
    case EntityKind.PROVIDER:
      return "provider";
    case EntityKind.POOL:
      return "pool";
    default:
      return `unknown kind ${kind}`;
  }
}
