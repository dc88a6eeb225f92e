// Reconnect delays: exponential from the server's `retry:`, capped, with jitter so that the
// clients of a restarted server do not all come back in the same instant.

/**
 * The delay before reconnect attempt `attempt` (0 for the first after a drop): a random
 * value in [d/2, d] where d = min(cap, base × 2^attempt).
 */
export function backoffDelay(attempt: number, baseMs: number, capMs: number): number {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 30));
  return Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
}
