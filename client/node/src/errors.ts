// Failed calls: the status code, google.rpc.BadRequest violations and RetryInfo,
// decoded from the grpc-status-details-bin trailer without googleapis packages.
import { BinaryReader } from "@bufbuild/protobuf/wire";
import { Metadata, ServiceError, status } from "@grpc/grpc-js";

export const REQUEST_ID_KEY = "esm2-request-id";
const DETAILS_KEY = "grpc-status-details-bin";

/** One invalid field, e.g. { field: "items[27].sequence", description: "character 'a' ..." }. */
export interface Violation {
  field: string;
  description: string;
}

/**
 * A failed call: `code` (a grpc-js `status` value) and `codeName` ("INVALID_ARGUMENT"),
 * the message, every BadRequest violation with items numbered in the caller's list
 * (however it was split into requests), `retryAfterS` from RetryInfo, and the ids the
 * frontend logged the calls under.
 */
export class Esm2Error extends Error {
  constructor(
    readonly code: status,
    readonly details: string,
    readonly violations: Violation[] = [],
    readonly retryAfterS: number | undefined = undefined,
    readonly requestIds: string[] = [],
  ) {
    super(`${status[code]}: ${details}`);
    this.name = "Esm2Error";
  }

  get codeName(): string {
    return status[this.code];
  }
}

/** Fields of a protobuf message: field number -> every value (bytes or varint). */
function fields(bytes: Uint8Array): Map<number, (Uint8Array | bigint)[]> {
  const reader = new BinaryReader(bytes);
  const found = new Map<number, (Uint8Array | bigint)[]>();
  while (reader.pos < reader.len) {
    const [number, wireType] = reader.tag();
    const value = wireType === 2 ? reader.bytes() : wireType === 0 ? BigInt(reader.uint64()) : undefined;
    if (value === undefined) reader.skip(wireType);
    else found.set(number, [...(found.get(number) ?? []), value]);
  }
  return found;
}

const text = (value: Uint8Array | bigint | undefined): string =>
  value instanceof Uint8Array ? new TextDecoder().decode(value) : "";

const ITEM_FIELD = /^items\[(\d+)\]/;

/** "items[3].sequence" of a request whose first item is the caller's `offset`. */
export function shiftItem(field: string, offset: number): string {
  return field.replace(ITEM_FIELD, (_, index: string) => `items[${Number(index) + offset}]`);
}

/** An Esm2Error from a grpc-js error of the request starting at item `offset`. */
export function callError(error: ServiceError, offset: number): Esm2Error {
  const metadata = error.metadata ?? new Metadata();
  const violations: Violation[] = [];
  let retryAfterS: number | undefined;
  for (const raw of metadata.get(DETAILS_KEY)) {
    for (const any of fields(raw as Uint8Array).get(3) ?? []) {
      const detail = fields(any as Uint8Array);
      const typeUrl = text(detail.get(1)?.[0]);
      const value = (detail.get(2)?.[0] as Uint8Array | undefined) ?? new Uint8Array();
      if (typeUrl.endsWith("/google.rpc.BadRequest")) {
        for (const violation of fields(value).get(1) ?? []) {
          const parts = fields(violation as Uint8Array);
          const field = shiftItem(text(parts.get(1)?.[0]), offset);
          violations.push({ field, description: text(parts.get(2)?.[0]) });
        }
      } else if (typeUrl.endsWith("/google.rpc.RetryInfo")) {
        const delay = fields((fields(value).get(1)?.[0] as Uint8Array) ?? new Uint8Array());
        retryAfterS = Number(delay.get(1)?.[0] ?? 0n) + Number(delay.get(2)?.[0] ?? 0n) / 1e9;
      }
    }
  }
  const requestIds = metadata.get(REQUEST_ID_KEY).map(String);
  return new Esm2Error(error.code, error.details, violations, retryAfterS, requestIds);
}

/** "invalid request: FIELD: TEXT; ... (and N more)", as the service words it. */
export function violationsMessage(violations: Violation[]): string {
  const shown = violations.slice(0, 5).map((v) => `${v.field}: ${v.description}`);
  const more = violations.length > 5 ? ` (and ${violations.length - 5} more)` : "";
  return `invalid request: ${shown.join("; ")}${more}`;
}

/** One INVALID_ARGUMENT of the refusals of several requests (each named by its offset):
 * every violation once, items in the caller's numbering, in list order. */
export function mergeRefusals(refusals: Map<number, Esm2Error>): Esm2Error {
  const ordered = [...refusals].sort((a, b) => a[0] - b[0]).map(([, error]) => error);
  const seen = new Set<string>();
  const unique = ordered.flatMap((error) => error.violations).filter((v) => {
    const key = `${v.field}\n${v.description}`; // a parameter's comes once from every request
    return !seen.has(key) && seen.add(key);
  });
  // Item violations first, by item, then the others (parameters), each group in its
  // original order: the order the service lists one request's in.
  const item = (v: Violation) => Number(ITEM_FIELD.exec(v.field)?.[1] ?? Infinity);
  const violations = unique.map((v, i) => [v, i] as const).sort((a, b) => item(a[0]) - item(b[0]) || a[1] - b[1]).map(([v]) => v);
  const ids = ordered.flatMap((error) => error.requestIds);
  return new Esm2Error(status.INVALID_ARGUMENT, violationsMessage(violations), violations, undefined, ids);
}
