// Duplicate suppression: remembers the most recent ids delivered per endpoint, so that a
// record replayed around a reconnect is delivered once. Ids are opaque: only equality is used.

export class RecentIds {
  private readonly byEndpoint = new Map<string, Set<string>>();

  constructor(private readonly capacity: number) {}

  /** Records `id` for `endpoint`; false when it was already there. */
  add(endpoint: string, id: string): boolean {
    let ids = this.byEndpoint.get(endpoint);
    if (ids === undefined) {
      ids = new Set();
      this.byEndpoint.set(endpoint, ids);
    }
    if (ids.has(id)) return false;
    ids.add(id);
    if (ids.size > this.capacity) {
      // A Set iterates in insertion order: the first id is the oldest.
      const oldest = ids.values().next();
      if (oldest.done !== true) ids.delete(oldest.value);
    }
    return true;
  }
}
