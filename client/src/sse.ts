// The streaming `text/event-stream` parser, as the WHATWG HTML standard specifies it: text
// is fed in chunks split anywhere; lines end in CRLF, LF or CR; comments are ignored; data
// lines join with LF; `retry:` is reported at once; a block with an id but no data only
// moves the last event id.

/** One dispatched event. */
export interface SseMessage {
  /** The event type (`message` when the block named none). */
  event: string;
  data: string;
  /** The block's own `id:` field, when it had one. */
  id: string | undefined;
}

export interface SseHandlers {
  onMessage(message: SseMessage): void;
  /** A block that set an id but carried no data (the stream's start position, for Fjord). */
  onId(id: string): void;
  onRetry(ms: number): void;
}

export class SseParser {
  private buffer = "";
  /** The previous chunk ended in CR: a LF at the start of the next one belongs to it. */
  private pendingCr = false;
  private data: string[] = [];
  private event = "";
  private id: string | undefined = undefined;

  constructor(private readonly handlers: SseHandlers) {}

  /** Feeds decoded text; dispatches every event completed by it. */
  feed(chunk: string): void {
    if (chunk === "") return;
    let text = chunk;
    if (this.pendingCr && text.startsWith("\n")) text = text.slice(1);
    this.pendingCr = false;
    let start = 0;
    const buffered = this.buffer + text;
    const offset = this.buffer.length;
    this.buffer = "";
    // Only the new text can hold line ends: the buffer never does.
    for (let i = offset; i < buffered.length; i++) {
      const c = buffered.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      this.line(buffered.slice(start, i));
      if (c === 13) {
        if (i + 1 === buffered.length) this.pendingCr = true;
        else if (buffered.charCodeAt(i + 1) === 10) i++;
      }
      start = i + 1;
    }
    this.buffer = buffered.slice(start);
  }

  private line(line: string): void {
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    switch (field) {
      case "data":
        this.data.push(value);
        break;
      case "event":
        this.event = value;
        break;
      case "id":
        if (!value.includes("\0")) this.id = value;
        break;
      case "retry":
        if (/^\d+$/.test(value)) this.handlers.onRetry(Number(value));
        break;
      default:
        break;
    }
  }

  private dispatch(): void {
    const { id, event, data } = this;
    this.id = undefined;
    this.event = "";
    this.data = [];
    if (data.length === 0) {
      if (id !== undefined) this.handlers.onId(id);
      return;
    }
    this.handlers.onMessage({ event: event === "" ? "message" : event, data: data.join("\n"), id });
  }
}
