// The SSE parser against the standard's edge cases: chunks split anywhere, every line ending,
// comments, multi-line data, retry, id-only blocks.

import { describe, expect, it } from "vitest";
import { SseParser, type SseMessage } from "../src/sse.js";

type Seen = { message: SseMessage } | { id: string } | { retry: number };

function parse(chunks: readonly string[]): Seen[] {
  const seen: Seen[] = [];
  const parser = new SseParser({
    onMessage: (message) => seen.push({ message }),
    onId: (id) => seen.push({ id }),
    onRetry: (retry) => seen.push({ retry }),
  });
  for (const chunk of chunks) parser.feed(chunk);
  return seen;
}

const STREAM =
  "retry: 2000\nid: 1-0\n\n" +
  ": heartbeat\n\n" +
  'id: 5-0\nevent: orders\ndata: {"a":1}\n\n' +
  "event: fjord.gap\ndata: {}\n\n" +
  "id: 6-0_7-0\nevent: drivers\ndata: line one\ndata: line two\n\n";

const EXPECTED: Seen[] = [
  { retry: 2000 },
  { id: "1-0" },
  { message: { event: "orders", data: '{"a":1}', id: "5-0" } },
  { message: { event: "fjord.gap", data: "{}", id: undefined } },
  { message: { event: "drivers", data: "line one\nline two", id: "6-0_7-0" } },
];

describe("SseParser", () => {
  it("parses a whole stream", () => {
    expect(parse([STREAM])).toEqual(EXPECTED);
  });

  it("gives the same events however the text is split in two", () => {
    for (let at = 0; at <= STREAM.length; at++) {
      expect(parse([STREAM.slice(0, at), STREAM.slice(at)])).toEqual(EXPECTED);
    }
  });

  it("gives the same events one character at a time", () => {
    expect(parse([...STREAM])).toEqual(EXPECTED);
  });

  it("accepts CRLF and lone CR line endings, also split between chunks", () => {
    const crlf = STREAM.replaceAll("\n", "\r\n");
    const cr = STREAM.replaceAll("\n", "\r");
    expect(parse([crlf])).toEqual(EXPECTED);
    expect(parse([cr])).toEqual(EXPECTED);
    for (let at = 0; at <= crlf.length; at++) {
      expect(parse([crlf.slice(0, at), "", crlf.slice(at)])).toEqual(EXPECTED);
    }
  });

  it("ignores comments, unknown fields and bad retry values", () => {
    expect(parse([":c\nfoo: bar\nretry: 12x\nretry:\ndata: x\n: after\n\n"])).toEqual([
      { message: { event: "message", data: "x", id: undefined } },
    ]);
  });

  it("strips one space after the colon, and takes a field without colon as empty", () => {
    expect(parse(["data:  two spaces\ndata\ndata:no space\n\n"])).toEqual([
      { message: { event: "message", data: " two spaces\n\nno space", id: undefined } },
    ]);
  });

  it("keeps colons inside values", () => {
    expect(parse(['data: {"k":"a:b"}\n\n'])).toEqual([
      { message: { event: "message", data: '{"k":"a:b"}', id: undefined } },
    ]);
  });

  it("dispatches nothing for an incomplete block, and resets between blocks", () => {
    expect(parse(["event: orders\ndata: x\n"])).toEqual([]);
    expect(parse(["event: orders\nid: 1\n\ndata: y\n\n"])).toEqual([
      { id: "1" },
      { message: { event: "message", data: "y", id: undefined } },
    ]);
  });

  it("ignores an id containing NUL", () => {
    expect(parse(["id: a\0b\ndata: x\n\n"])).toEqual([{ message: { event: "message", data: "x", id: undefined } }]);
  });
});
