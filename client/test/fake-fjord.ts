// A small Fjord on node:http for the table tests: it speaks the wire format of table
// endpoints. An endpoint named in `tables` keeps the latest record per key; a connection
// gets, per table endpoint, `fjord.snapshot_start`, one event per row without an `id:` line,
// and `fjord.snapshot_end` with the id to resume from, unless it resumes from an id still in
// the log (then only the records after it). Stream endpoints start live. Several endpoints
// on one connection have composite ids (`A_B`). The test writes records, trims the log (a
// resume from before the trim gets a snapshot again), cuts connections, and may have the
// next connection cut after some rows.

import { once } from "node:events";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";

export interface Envelope {
  topic: string;
  partition: number;
  offset: number;
  key: unknown;
  timestamp: number | null;
  headers: Record<string, unknown>;
  value: unknown;
}

interface Entry {
  seq: number;
  endpoint: string;
  envelope: Envelope;
}

/** What one request asked for. */
export interface Request {
  url: string;
  lastEventId: string | undefined;
}

interface Client {
  res: ServerResponse;
  endpoints: string[];
  keys: string[];
  /** The position per endpoint, as the composite id joins them. */
  positions: string[];
}

export class FakeFjord {
  base = "";
  readonly requests: Request[] = [];
  /** The snapshot of every connection, as its rows went out: endpoint and keys. */
  readonly snapshotsSent: { endpoint: string; keys: unknown[] }[] = [];
  /** Cut the next connection after this many snapshot rows (once). */
  cutAfterRows: number | undefined;
  private readonly tables: Map<string, Map<string, Envelope>>;
  private readonly log: Entry[] = [];
  private seq = 1000;
  private offset = 0;
  /** Records up to this seq are gone from the log: a resume from before it cannot be served. */
  private trimmed = 0;
  private readonly clients = new Set<Client>();
  private readonly server = createServer((req, res) => this.serve(req, res));

  constructor(tables: string[]) {
    this.tables = new Map(tables.map((name) => [name, new Map()]));
  }

  async start(): Promise<this> {
    this.server.listen(0, "127.0.0.1");
    await once(this.server, "listening");
    this.base = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
    return this;
  }

  async stop(): Promise<void> {
    this.server.closeAllConnections();
    this.server.close();
    await once(this.server, "close");
  }

  /** Writes a record (a tombstone when `value` is null) and sends it to every open connection. */
  write(endpoint: string, key: unknown, value: unknown): string {
    const envelope: Envelope = { topic: endpoint, partition: 0, offset: this.offset++, key, timestamp: 1764000000000, headers: {}, value };
    const entry = { seq: ++this.seq, endpoint, envelope };
    this.log.push(entry);
    const rows = this.tables.get(endpoint);
    if (rows !== undefined && key !== null) {
      if (value === null) rows.delete(rowId(key));
      else rows.set(rowId(key), envelope);
    }
    for (const client of this.clients) this.send(client, entry);
    return `${entry.seq}-0`;
  }

  /** The rows of a table endpoint now, by the client's row key. */
  rows(endpoint: string): Map<string, unknown> {
    return new Map([...(this.tables.get(endpoint) ?? [])].map(([key, envelope]) => [key, envelope.value]));
  }

  /** Forgets the log so far: resuming from an id before now needs a snapshot. */
  trim(): void {
    this.trimmed = this.seq;
    this.log.length = 0;
  }

  /** Cuts every open connection, as a network failure would. */
  cut(): void {
    for (const client of this.clients) client.res.socket?.destroy();
    this.clients.clear();
  }

  get open(): number {
    return this.clients.size;
  }

  private serve(req: IncomingMessage, res: ServerResponse): void {
    const url = new URL(req.url ?? "/", "http://fake");
    const lastEventId = req.headers["last-event-id"] as string | undefined;
    this.requests.push({ url: `${url.pathname}${url.search}`, lastEventId });
    const single = /^\/v1\/streams\/([^/]+)$/.exec(url.pathname)?.[1];
    const endpoints = single !== undefined ? [decodeURIComponent(single)] : url.searchParams.getAll("endpoint");
    const keys = url.searchParams.getAll("key");
    const resume = lastEventId?.split("_");
    if (resume !== undefined && resume.length !== endpoints.length) {
      res.writeHead(400, { "content-type": "application/json" });
      res.end(JSON.stringify({ error: { code: "bad_last_event_id", message: "positions do not match the endpoints" } }));
      return;
    }
    res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-store" });
    const now = `${this.seq}-0`;
    // Per endpoint: replay after this seq, or (a table) a snapshot first.
    const plan = endpoints.map((endpoint, i) => {
      const from = resume?.[i];
      const seq = from === undefined ? undefined : Number(from.split("-")[0]);
      const servable = seq !== undefined && seq > 0 && seq >= this.trimmed;
      if (this.tables.has(endpoint)) return servable ? { replayAfter: seq } : { snapshot: true };
      return { replayAfter: servable ? seq : this.seq };
    });
    const client: Client = {
      res,
      endpoints,
      keys,
      positions: endpoints.map((_, i) => (plan[i]?.snapshot ? "0-0" : `${plan[i]?.replayAfter}-0`)),
    };
    let text = `retry: 50\nid: ${client.positions.join("_")}\n\n`;
    let cutAfter = this.cutAfterRows;
    this.cutAfterRows = undefined;
    for (const [i, endpoint] of endpoints.entries()) {
      if (!plan[i]?.snapshot) continue;
      const sent: unknown[] = [];
      this.snapshotsSent.push({ endpoint, keys: sent });
      text += `event: fjord.snapshot_start\ndata: ${JSON.stringify({ endpoint })}\n\n`;
      const rows = [...(this.tables.get(endpoint) ?? new Map<string, Envelope>()).entries()].sort(([a], [b]) => (a < b ? -1 : 1));
      for (const [, envelope] of rows) {
        if (!this.wanted(client, envelope)) continue;
        if (cutAfter !== undefined && cutAfter-- === 0) {
          // The rows so far reach the client, then the connection breaks mid-snapshot.
          res.write(text, () => res.socket?.destroy());
          return;
        }
        sent.push(envelope.key);
        text += `event: ${endpoint}\ndata: ${JSON.stringify(envelope)}\n\n`;
      }
      client.positions[i] = now;
      text += `id: ${client.positions.join("_")}\nevent: fjord.snapshot_end\ndata: ${JSON.stringify({ endpoint })}\n\n`;
    }
    res.write(text);
    for (const entry of this.log) {
      const i = endpoints.indexOf(entry.endpoint);
      const after = plan[i]?.replayAfter;
      if (after !== undefined && entry.seq > after) this.send(client, entry);
    }
    this.clients.add(client);
    res.on("close", () => this.clients.delete(client));
  }

  private wanted(client: Client, envelope: Envelope): boolean {
    return client.keys.length === 0 || (typeof envelope.key === "string" && client.keys.includes(envelope.key));
  }

  private send(client: Client, { seq, endpoint, envelope }: Entry): void {
    const i = client.endpoints.indexOf(endpoint);
    if (i < 0 || !this.wanted(client, envelope)) return;
    client.positions[i] = `${seq}-0`;
    client.res.write(`id: ${client.positions.join("_")}\nevent: ${endpoint}\ndata: ${JSON.stringify(envelope)}\n\n`);
  }
}

/** The client's key of a row: the text itself, else its JSON. */
export function rowId(key: unknown): string {
  return typeof key === "string" ? key : JSON.stringify(key);
}
