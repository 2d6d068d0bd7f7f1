import { clone, create, equals, type DescField, type DescMessage, type Message } from "@bufbuild/protobuf";
import { reflect } from "@bufbuild/protobuf/reflect";
import type { EntityKind } from "../gen/modelmesh/state/v1/changes_pb.js";
import { applyChangeParts, entityLabelOf, schemasOfKind } from "./apply-entity-change.js";
import { entityKindName, type AnyEntityChange, type EntityValue } from "./entity.js";

/** Returns whether two values of one kind are equal. Two undefined values are equal. */
export function entityValueEquals(kind: EntityKind, a: EntityValue | undefined, b: EntityValue | undefined): boolean {
  if (a === undefined || b === undefined) {
    return a === b;
  }
  return equals(schemasOfKind(kind).state, a, b);
}

/**
 * Merges changes that a daemon accepted while its view of an entity was
 * `base` onto `theirs`, the value stored now, which another daemon may have
 * changed since. Returns the value to store, or undefined for a removed entity.
 *
 * - Amounts in add are added onto `theirs`, so that concurrent additions all count.
 * - Times in keep_latest replace those of `theirs` only when they are later.
 * - A field that set_fields names is written only while `theirs` still has
 *   the base value of that field. Otherwise the other daemon wrote it later,
 *   and its value stays.
 * - A removal applies only when `theirs` equals `base`. Otherwise the newer
 *   stored value stays, and the changes after the removal apply to it.
 * - When `theirs` is undefined because another daemon removed the entity,
 *   changes that add, set or keep the latest start from the default value of
 *   the kind, so the entity comes back with only our changes in it. Every field
 *   that set_fields names is written then.
 *
 * An undefined `base` compares as the default value. When `base` equals
 * `theirs`, the result is that of applyEntityChange on `base` for each change
 * in order. The one exception is an addition that would take a counter below
 * zero or past its maximum. applyEntityChange throws there, but the merge ends
 * the counter at that bound, because the changes were accepted earlier and
 * the merge must not fail on them.
 */
export function mergeEntityChanges(
  kind: EntityKind,
  base: EntityValue | undefined,
  theirs: EntityValue | undefined,
  ours: AnyEntityChange[],
): EntityValue | undefined {
  const stateSchema = schemasOfKind(kind).state;
  const theirsUnchanged = entityValueEquals(kind, base, theirs);
  const changedFields = theirs === undefined ? new Set<DescField>() : fieldsThatDiffer(stateSchema, base, theirs);

  let value = theirs;
  for (const entry of ours) {
    if (entry.kind !== kind) {
      throw new Error(
        `cannot merge a ${entityKindName(entry.kind)} change into a ${entityKindName(kind)}: the kinds differ`,
      );
    }
    if (entry.change.remove && !theirsUnchanged) {
      continue;
    }
    value = applyChangeParts(entry, value, {
      label: entityLabelOf(kind, entry.change.id),
      writesField: (field) => !changedFields.has(field),
      counterOverflow: "clamp",
    });
  }
  return value;
}

/** Returns the fields whose values differ between `base`, or the default value when undefined, and `theirs`. */
function fieldsThatDiffer(stateSchema: DescMessage, base: EntityValue | undefined, theirs: EntityValue): Set<DescField> {
  const baseValue = base ?? create(stateSchema);
  const differ = new Set<DescField>();
  for (const field of stateSchema.fields) {
    if (!equals(stateSchema, onlyField(stateSchema, baseValue, field), onlyField(stateSchema, theirs, field))) {
      differ.add(field);
    }
  }
  return differ;
}

/** Returns a copy of `value` with every field cleared except `field`. */
function onlyField(stateSchema: DescMessage, value: Message, field: DescField): Message {
  const copy = reflect(stateSchema, clone(stateSchema, value));
  for (const other of stateSchema.fields) {
    if (other !== field) {
      copy.clear(other);
    }
  }
  return copy.message;
}
