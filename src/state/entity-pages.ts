import { EntityKind } from "../gen/modelmesh/state/v1/changes_pb.js";
import type { PoolState, SystemState } from "../gen/modelmesh/state/v1/state_pb.js";
import type { EntityValue } from "./entity.js";
import { entityMap } from "./entity-events.js";

/** Target size of one page, well below the 4 MiB that most gRPC clients accept by default. */
const pageBytes = 1024 * 1024;
/** Maximum number of entities in one page. */
const pageEntities = 1000;

export interface PagedEntity {
  kind: EntityKind;
  id: string;
  value: EntityValue;
}

/**
 * Splits the entities of `state` that pass `include` into pages of at most
 * 1,000 entities and about 1 MiB. The size is an estimate: pools are
 * counted by their member ids, models and providers at a fixed upper bound.
 */
export function* entityPages(
  state: SystemState,
  include: (kind: EntityKind, id: string) => boolean = () => true,
): Generator<PagedEntity[]> {
  let page: PagedEntity[] = [];
  let bytes = 0;
  for (const kind of [EntityKind.MODEL, EntityKind.PROVIDER, EntityKind.POOL]) {
    for (const [id, value] of Object.entries(entityMap(state, kind))) {
      if (!include(kind, id)) continue;
      const size = estimateBytes(kind, id, value);
      if (page.length > 0 && (page.length >= pageEntities || bytes + size > pageBytes)) {
        yield page;
        page = [];
        bytes = 0;
      }
      page.push({ kind, id, value });
      bytes += size;
    }
  }
  if (page.length > 0) yield page;
}

function estimateBytes(kind: EntityKind, id: string, value: EntityValue): number {
  // A model or provider encodes to well under 200 bytes besides its id.
  const fixed = 200 + id.length * 3;
  if (kind !== EntityKind.POOL) return fixed;
  const pool = value as PoolState;
  let members = 0;
  for (const member of pool.activeModels) members += member.length * 3 + 3;
  for (const member of pool.standbyModels) members += member.length * 3 + 3;
  return fixed + members;
}
