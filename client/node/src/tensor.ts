// Packed tensors: reassembling chunks and decoding float32, float16 and bfloat16.
import { Dtype, Include, ItemComplete, TensorChunk, Tensor as WireTensor } from "./gen/esm2/v1/esm2";

/** A decoded tensor: float32 values in C order, whatever dtype it travelled in. */
export interface Tensor {
  shape: number[];
  data: Float32Array;
}

/** The server's response stream broke the wire format's rules (protos/README.md). */
export class ResultStreamError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ResultStreamError";
  }
}

function elementSize(dtype: Dtype): number {
  switch (dtype) {
    case Dtype.DTYPE_UNSPECIFIED:
    case Dtype.DTYPE_FLOAT32:
      return 4;
    case Dtype.DTYPE_FLOAT16:
    case Dtype.DTYPE_BFLOAT16:
      return 2;
  }
  throw new Error(`unknown tensor dtype ${dtype}`);
}

function resolveDtype(dtype: Dtype): Dtype {
  return dtype === Dtype.DTYPE_UNSPECIFIED ? Dtype.DTYPE_FLOAT32 : dtype;
}

/** IEEE 754 binary16 bits to float32, exactly (every float16 is a float32). */
export function float16ToFloat32(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const mantissa = bits & 0x3ff;
  if (exponent === 0x1f) return mantissa ? NaN : sign * Infinity;
  if (exponent === 0) return sign * mantissa * 2 ** -24;
  return sign * (1024 + mantissa) * 2 ** (exponent - 25);
}

/** Little-endian bytes of `dtype` to float32. */
export function decodeFloats(bytes: Uint8Array, dtype: Dtype): Float32Array {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const resolved = resolveDtype(dtype);
  if (resolved === Dtype.DTYPE_FLOAT32) {
    const out = new Float32Array(bytes.byteLength / 4);
    for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(4 * i, true);
    return out;
  }
  const out = new Float32Array(bytes.byteLength / 2);
  const widened = new DataView(out.buffer);
  for (let i = 0; i < out.length; i++) {
    const bits = view.getUint16(2 * i, true);
    if (resolved === Dtype.DTYPE_BFLOAT16) widened.setUint32(4 * i, bits << 16, true);
    else out[i] = float16ToFloat32(bits);
  }
  return out;
}

/** Rebuilds one tensor from chunks that may arrive in any order. */
export class TensorAssembler {
  readonly dtype: Dtype;
  readonly shape: number[];
  readonly buffer: Uint8Array;
  private readonly ranges = new Map<number, number>(); // offset -> longest chunk there

  constructor(tensor: WireTensor) {
    this.dtype = resolveDtype(tensor.dtype);
    this.shape = tensor.shape.map(Number);
    if (this.shape.some((dim) => dim < 0)) throw new Error(`negative dimension in shape ${this.shape}`);
    const elements = this.shape.reduce((product, dim) => product * dim, 1);
    this.buffer = new Uint8Array(elements * elementSize(tensor.dtype));
  }

  add(chunk: TensorChunk): void {
    const tensor = chunk.tensor!;
    const shape = tensor.shape.map(Number);
    if (resolveDtype(tensor.dtype) !== this.dtype || shape.join() !== this.shape.join()) {
      throw new Error("chunk disagrees with the tensor's dtype or shape");
    }
    const start = Number(chunk.offset);
    const end = start + tensor.data.byteLength;
    if (start < 0 || end > this.buffer.byteLength) {
      throw new Error(`chunk bytes [${start}, ${end}) outside tensor of ${this.buffer.byteLength}`);
    }
    this.buffer.set(tensor.data, start);
    this.ranges.set(start, Math.max(tensor.data.byteLength, this.ranges.get(start) ?? 0));
  }

  /** Bytes from offset 0 covered without a gap. */
  covered(): number {
    let covered = 0;
    for (const [offset, length] of [...this.ranges].sort((a, b) => a[0] - b[0])) {
      if (offset > covered) break;
      covered = Math.max(covered, offset + length);
    }
    return covered;
  }

  get complete(): boolean {
    return this.covered() === this.buffer.byteLength;
  }

  tensor(): Tensor {
    return { shape: this.shape, data: decodeFloats(this.buffer, this.dtype) };
  }
}

/** What EncodeResponse and PredictResponse share: the same fields. */
export interface Response {
  sequenceIndex: number;
  chunk?: TensorChunk | undefined;
  complete?: ItemComplete | undefined;
}

export interface CompletedItem {
  tensors: Map<string, Tensor>; // by tensorKey(kind, layer)
  complete: ItemComplete;
}

export const tensorKey = (kind: Include, layer: number): string => `${kind}/${layer}`;

export function kindName(kind: Include): string {
  const name = Include[kind];
  return name === undefined ? String(kind) : name.replace(/^INCLUDE_/, "").toLowerCase();
}

/** Rebuilds the items of one response stream, checking every rule of the wire format. */
export class StreamAssembler {
  private readonly pending = new Map<number, Map<string, TensorAssembler>>();
  private readonly done = new Map<number, CompletedItem>();

  constructor(private readonly items: number) {}

  add(message: Response): void {
    const index = message.sequenceIndex;
    if (!(index >= 0 && index < this.items)) {
      throw new ResultStreamError(`sequence_index ${index} outside the request's ${this.items} items`);
    }
    if (this.done.has(index)) throw new ResultStreamError(`item ${index}: message after its ItemComplete`);
    if (message.chunk) this.addChunk(index, message.chunk);
    else if (message.complete) this.finishItem(index, message.complete);
    else throw new ResultStreamError(`item ${index}: a response with neither chunk nor complete`);
  }

  private addChunk(index: number, chunk: TensorChunk): void {
    const key = tensorKey(chunk.kind, chunk.layer);
    const tensors = this.pending.get(index) ?? new Map<string, TensorAssembler>();
    this.pending.set(index, tensors);
    try {
      if (!chunk.tensor) throw new Error("no tensor");
      let assembler = tensors.get(key);
      if (!assembler) {
        assembler = new TensorAssembler(chunk.tensor);
        tensors.set(key, assembler);
      }
      assembler.add(chunk);
    } catch (error) {
      const where = `item ${index} ${kindName(chunk.kind)} layer ${chunk.layer}`;
      throw new ResultStreamError(`${where}: bad chunk: ${(error as Error).message}`);
    }
  }

  private finishItem(index: number, complete: ItemComplete): void {
    const tensors = new Map<string, Tensor>();
    for (const [key, assembler] of this.pending.get(index) ?? []) {
      if (!assembler.complete) {
        const [kind, layer] = key.split("/").map(Number);
        throw new ResultStreamError(
          `item ${index}: ${kindName(kind)} layer ${layer} incomplete at the item's ItemComplete ` +
            `(${assembler.covered()} of ${assembler.buffer.byteLength} bytes)`,
        );
      }
      tensors.set(key, assembler.tensor());
    }
    this.pending.delete(index);
    this.done.set(index, { tensors, complete });
  }

  /** The items in request order, once the stream has ended. */
  finish(): CompletedItem[] {
    const missing = [...Array(this.items).keys()].filter((i) => !this.done.has(i));
    if (missing.length) throw new ResultStreamError(`stream ended before items [${missing}] were complete`);
    return [...Array(this.items).keys()].map((i) => this.done.get(i)!);
  }
}
