// Talking to lmforge's OpenAI-compatible server: the model list, /tokenize, and
// streamed chat completions read as server-sent events from a plain fetch() (EventSource
// cannot POST, and fetch can be aborted: aborting is how the Stop button cancels a reply).

/** An error the server explained: the `error.message` of an OpenAI-style error body. */
export class ApiError extends Error {
  constructor(message, { status = 0, type = "", code = null, param = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.type = type;
    this.code = code;
    this.param = param;
  }
}

export class Api {
  /** @param {() => string} apiKey returns the key to send, or "" for none */
  constructor(apiKey) {
    this.apiKey = apiKey;
  }

  headers() {
    const headers = { "Content-Type": "application/json", Accept: "application/json" };
    const key = this.apiKey().trim();
    if (key) headers.Authorization = `Bearer ${key}`;
    return headers;
  }

  /** GET /v1/models → [{id, max_model_len, ...}] */
  async models(signal) {
    const body = await this.json("GET", "/v1/models", undefined, signal);
    if (!Array.isArray(body?.data)) throw new ApiError("the server's /v1/models answer has no model list");
    return body.data;
  }

  /** GET /rag/indexes → [{name, passages, embedder}]: what a chat turn may retrieve from */
  async ragIndexes(signal) {
    const body = await this.json("GET", "/rag/indexes", undefined, signal);
    return Array.isArray(body?.data) ? body.data : [];
  }

  /** POST /tokenize → {tokens, token_strs, count, max_model_len} */
  tokenize(request, signal) {
    return this.json("POST", "/tokenize", request, signal);
  }

  async json(method, path, body, signal) {
    const response = await this.send(method, path, body, signal);
    return response.json();
  }

  async send(method, path, body, signal) {
    let response;
    try {
      response = await fetch(path, {
        method,
        headers: this.headers(),
        body: body === undefined ? undefined : JSON.stringify(body),
        signal,
      });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(`cannot reach the server (${err.message})`);
    }
    if (!response.ok) throw await errorFrom(response);
    return response;
  }

  /**
   * POST /v1/chat/completions with stream: true; yields each chunk as it arrives.
   * Ends at `data: [DONE]`; an `{"error": ...}` event mid-stream is thrown as an ApiError.
   */
  async *streamChat(request, signal) {
    const response = await this.send("POST", "/v1/chat/completions", { ...request, stream: true }, signal);
    if (!response.body) throw new ApiError("the browser gave no response stream");
    for await (const data of serverSentEvents(response.body)) {
      if (data === "[DONE]") return;
      let chunk;
      try {
        chunk = JSON.parse(data);
      } catch {
        throw new ApiError(`the server sent an event that is not JSON: ${data.slice(0, 80)}`);
      }
      if (chunk.error) throw apiErrorOf(chunk.error, 0);
      yield chunk;
    }
  }
}

/** The data of each server-sent event in a byte stream (the `data:` lines of one event, joined). */
export async function* serverSentEvents(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      // Events end with a blank line; the last piece may still be arriving.
      const events = buffer.split(/\r\n\r\n|\n\n|\r\r/);
      buffer = done ? "" : events.pop();
      for (const event of events) {
        const data = dataOf(event);
        if (data !== null) yield data;
      }
      if (done) return;
    }
  } finally {
    reader.releaseLock();
  }
}

function dataOf(event) {
  const lines = [];
  for (const line of event.split(/\r\n|\n|\r/)) {
    if (line.startsWith("data:")) lines.push(line.slice(line.startsWith("data: ") ? 6 : 5));
  }
  return lines.length ? lines.join("\n") : null;
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: fall through to the status line
  }
  if (body?.error) return apiErrorOf(body.error, response.status);
  if (body?.detail) {  // a framework's own error shape, e.g. a validation error before our handler
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    return new ApiError(`${response.status}: ${detail}`, { status: response.status });
  }
  const reason = response.statusText || "request failed";
  return new ApiError(`${response.status} ${reason}`, { status: response.status });
}

function apiErrorOf(error, status) {
  const message = typeof error === "string" ? error : error.message || JSON.stringify(error);
  return new ApiError(message, { status, type: error.type, code: error.code, param: error.param });
}
