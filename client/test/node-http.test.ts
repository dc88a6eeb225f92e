// Node's real fetch against a real HTTP server (node:http) that streams SSE in small writes,
// drops the socket, replays, expires the token and finally refuses it: the client resumes
// with Last-Event-ID, delivers each record once and stops with the server's reason.

import { once } from "node:events";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { setTimeout as sleep } from "node:timers/promises";
import { afterAll, beforeAll, expect, it } from "vitest";
import { connect, type FjordError, type FjordRecord, type Status } from "../src/index.js";
import { recordEvent } from "./scripted.js";

interface Seen {
  url: string | undefined;
  authorization: string | undefined;
  lastEventId: string | undefined;
}

const seen: Seen[] = [];
const server = createServer((req, res) => void serve(req, res));
let base = "";

async function serve(req: IncomingMessage, res: ServerResponse): Promise<void> {
  const n = seen.push({
    url: req.url,
    authorization: req.headers.authorization,
    lastEventId: req.headers["last-event-id"] as string | undefined,
  });
  if (n >= 3) {
    res.writeHead(401, { "content-type": "application/json" });
    res.end(JSON.stringify({ error: { code: "token_invalid", message: `token ${n} is not valid` } }));
    return;
  }
  res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-store" });
  res.flushHeaders();
  if (n === 1) {
    res.write("retry: 50\nid: 0-0\n\n");
    const text = recordEvent("orders", "1-0", { value: { n: 1 } }) + ": heartbeat\n\n" + recordEvent("orders", "2-0");
    // Separate writes, one cut in the middle of a line.
    for (const piece of [text.slice(0, 30), text.slice(30, 31), text.slice(31)]) {
      res.write(piece);
      await sleep(10);
    }
    res.socket?.destroy();
  } else {
    res.write("retry: 50\nid: 2-0\n\n" + recordEvent("orders", "2-0") + recordEvent("orders", "3-0"));
    await sleep(10);
    res.write("event: fjord.expired\ndata: {}\n\n");
  }
}

beforeAll(async () => {
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});

afterAll(async () => {
  server.closeAllConnections();
  server.close();
  await once(server, "close");
});

it("streams, resumes and refuses over real HTTP with Node's fetch", async () => {
  const records: FjordRecord[] = [];
  const errors: FjordError[] = [];
  const statuses: Status[] = [];
  let tokens = 0;
  const closed = new Promise<void>((resolve) => {
    connect({
      url: base,
      endpoints: "orders",
      keys: ["order-1"],
      getToken: () => `token-${++tokens}`,
      onRecord: (record) => records.push(record),
      onError: (error) => errors.push(error),
      onStatus: (status) => {
        statuses.push(status);
        if (status === "closed") resolve();
      },
    });
  });
  await closed;
  expect(records.map((r) => [r.id, r.value])).toEqual([
    ["1-0", { n: 1 }],
    ["2-0", null],
    ["3-0", null],
  ]);
  expect(seen).toEqual([
    { url: "/v1/streams/orders?key=order-1", authorization: "Bearer token-1", lastEventId: undefined },
    { url: "/v1/streams/orders?key=order-1", authorization: "Bearer token-2", lastEventId: "2-0" },
    { url: "/v1/streams/orders?key=order-1", authorization: "Bearer token-3", lastEventId: "3-0" },
    { url: "/v1/streams/orders?key=order-1", authorization: "Bearer token-4", lastEventId: "3-0" },
  ]);
  expect(errors.map((e) => [e.code, e.status, e.fatal])).toEqual([
    ["network", undefined, false],
    ["token_invalid", 401, false],
    ["token_invalid", 401, true],
  ]);
  expect(errors.at(-1)?.message).toBe("token 4 is not valid");
  expect(statuses).toEqual(["connecting", "open", "reconnecting", "open", "reconnecting", "reconnecting", "closed"]);
});
