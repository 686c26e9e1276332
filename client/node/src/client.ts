// Esm2Client: encode, predict and status against the esm2.v1.Esm2Service.
import { ChannelCredentials, ClientReadableStream, Metadata, ServiceError, credentials, status } from "@grpc/grpc-js";

import {
  Dtype,
  EncodeParams,
  Esm2ServiceClient,
  GetStatusResponse,
  Include,
  Item,
  ModelInfo,
} from "./gen/esm2/v1/esm2";
import { Esm2Error, callError, mergeRefusals } from "./errors";
import { CompletedItem, ResultStreamError, Response, StreamAssembler, Tensor, kindName, tensorKey } from "./tensor";

export const MAX_ITEMS_PER_REQUEST = 8;

export type IncludeName = "mean" | "per_token" | "bos" | "contacts" | "logits" | "attentions";
export type DtypeName = "float32" | "float16" | "bfloat16";

const INCLUDE: Record<IncludeName, Include> = {
  mean: Include.INCLUDE_MEAN,
  per_token: Include.INCLUDE_PER_TOKEN,
  bos: Include.INCLUDE_BOS,
  contacts: Include.INCLUDE_CONTACTS,
  logits: Include.INCLUDE_LOGITS,
  attentions: Include.INCLUDE_ATTENTIONS,
};
const DTYPE: Record<DtypeName, Dtype> = {
  float32: Dtype.DTYPE_FLOAT32,
  float16: Dtype.DTYPE_FLOAT16,
  bfloat16: Dtype.DTYPE_BFLOAT16,
};
const LAYERED = new Set([Include.INCLUDE_MEAN, Include.INCLUDE_PER_TOKEN, Include.INCLUDE_BOS]);

export interface ClientOptions {
  /** Sent as `authorization: Token <token>` on every call. */
  token?: string;
  /** Use TLS: true for the system's roots, or a PEM CA bundle; omitted: plaintext. */
  tls?: boolean | { ca?: Buffer; cert?: Buffer; key?: Buffer };
  /** Deadline of each request in seconds; omitted: none. */
  timeoutS?: number;
  /** Requests in flight when a list is split (default 8). */
  maxConcurrency?: number;
  /** Sequences per request, 1 to 8 (default 8). */
  batchSize?: number;
}

export interface EncodeOptions {
  include?: IncludeName[]; // default ["mean"]
  reprLayers?: number[]; // layers 0 to 6, -1 is 6; default [-1]
  dtype?: DtypeName; // wire precision, default "float32"
}

/** What encode returned for one sequence; per-layer maps are keyed by the resolved layer. */
export interface EncodeResult {
  sequenceIndex: number; // position in the caller's list
  embeddings: Map<number, Tensor>; // mean over residues, [320]
  perToken: Map<number, Tensor>; // [L, 320]
  bos: Map<number, Tensor>; // [320]
  contacts?: Tensor; // [L, L]
  logits?: Tensor; // [L, 33], columns in vocabTokens order
  attentions?: Tensor; // [20, L, L], last layer
  vocabTokens: string[];
  model?: ModelInfo; // model.randomWeights: the service runs random weights
}

export interface PredictResult {
  sequenceIndex: number;
  logits: Tensor; // [n_masked, 33], one row per <mask>
  sequenceTokens: string[]; // the tokenized input, "<mask>" as one token
  vocabTokens: string[];
  model?: ModelInfo;
}

/** A message of a packed stream (EncodePacked, PredictPacked): several responses in order. */
interface PackedResponse {
  responses: Response[];
}
type Stream = ClientReadableStream<Response | PackedResponse>;
/** Starts one request's call: the packed method (`packed`) or the plain one. */
type StartCall = (items: Item[], metadata: Metadata, deadline: Date | undefined, packed: boolean) => Stream;

function channelCredentials(tls: ClientOptions["tls"]): ChannelCredentials {
  if (!tls) return credentials.createInsecure();
  if (tls === true) return credentials.createSsl();
  return credentials.createSsl(tls.ca ?? null, tls.key ?? null, tls.cert ?? null);
}

/**
 * A client of one service. Lists longer than `batchSize` are split into concurrent
 * requests; results come back in the caller's order, every tensor as float32.
 * Failures reject with Esm2Error (status code, violations) or ResultStreamError.
 */
export class Esm2Client {
  private readonly stub: Esm2ServiceClient;
  private readonly maxConcurrency: number;
  private readonly batchSize: number;
  /** Encode and Predict go packed (several responses to a message: less CPU at both
   * ends) until a server answers UNIMPLEMENTED; then this client calls the plain ones. */
  private packed = true;

  constructor(
    target: string,
    private readonly options: ClientOptions = {},
  ) {
    this.maxConcurrency = options.maxConcurrency ?? 8;
    this.batchSize = options.batchSize ?? MAX_ITEMS_PER_REQUEST;
    if (this.maxConcurrency < 1) throw new RangeError("maxConcurrency must be at least 1");
    if (!(this.batchSize >= 1 && this.batchSize <= MAX_ITEMS_PER_REQUEST)) {
      throw new RangeError(`batchSize must be 1 to ${MAX_ITEMS_PER_REQUEST}`);
    }
    this.stub = new Esm2ServiceClient(target, channelCredentials(options.tls));
  }

  close(): void {
    this.stub.close();
  }

  async encode(sequences: string[], options: EncodeOptions = {}): Promise<EncodeResult[]> {
    const params: EncodeParams = {
      include: (options.include ?? ["mean"]).map((name) => lookup(INCLUDE, name, "include")),
      reprLayers: options.reprLayers ?? [],
      dtype: lookup(DTYPE, options.dtype ?? "float32", "dtype"),
    };
    const layers = (params.reprLayers.length ? params.reprLayers : [-1]).map((l) => (l < 0 ? l + 7 : l));
    const items = await this.run(sequences, (batch, metadata, deadline, packed) =>
      packed
        ? (this.stub.encodePacked({ items: batch, params }, metadata, { deadline }) as Stream)
        : (this.stub.encode({ items: batch, params }, metadata, { deadline }) as Stream),
    );
    return items.map((item, index) => encodeResult(item, index, params.include, layers));
  }

  async predict(sequences: string[], dtype: DtypeName = "float32"): Promise<PredictResult[]> {
    const params = { dtype: lookup(DTYPE, dtype, "dtype") };
    const items = await this.run(sequences, (batch, metadata, deadline, packed) =>
      packed
        ? (this.stub.predictPacked({ items: batch, params }, metadata, { deadline }) as Stream)
        : (this.stub.predict({ items: batch, params }, metadata, { deadline }) as Stream),
    );
    return items.map((item, index) => {
      const logits = single(item, index, Include.INCLUDE_LOGITS);
      if (!logits) throw new ResultStreamError(`item ${index}: no logits tensor`);
      return {
        sequenceIndex: index,
        logits,
        sequenceTokens: item.complete.sequenceTokens,
        vocabTokens: item.complete.vocabTokens,
        model: item.complete.model,
      };
    });
  }

  /** The service's live workers, their models, and the queue depth. */
  status(): Promise<GetStatusResponse> {
    return new Promise((resolve, reject) => {
      this.stub.getStatus({}, this.metadata(), { deadline: this.deadline() }, (error, response) =>
        error ? reject(callError(error, 0)) : resolve(response),
      );
    });
  }

  private metadata(): Metadata {
    const metadata = new Metadata();
    if (this.options.token) metadata.set("authorization", `Token ${this.options.token}`);
    return metadata;
  }

  private deadline(): Date | undefined {
    const timeout = this.options.timeoutS;
    return timeout === undefined ? undefined : new Date(Date.now() + 1000 * timeout);
  }

  /** Every batch's items, in the caller's order. Refusals (INVALID_ARGUMENT) of every
   * request are merged into one Esm2Error; any other failure is thrown as it comes. */
  private async run(sequences: string[], start: StartCall): Promise<CompletedItem[]> {
    const batches: [number, string[]][] = [];
    for (let offset = 0; offset < sequences.length; offset += this.batchSize) {
      batches.push([offset, sequences.slice(offset, offset + this.batchSize)]);
    }
    const refusals = new Map<number, Esm2Error>();
    const results: CompletedItem[][] = new Array(batches.length);
    const active = new Set<Stream>();
    let next = 0;
    let failed = false;
    const worker = async (): Promise<void> => {
      while (next < batches.length && !failed) {
        const position = next++;
        const [offset, batch] = batches[position];
        try {
          results[position] = await this.runBatch(batch, start, active);
        } catch (error) {
          const refusal = isServiceError(error) ? callError(error, offset) : error;
          if (refusal instanceof Esm2Error && refusal.codeName === "INVALID_ARGUMENT") {
            refusals.set(offset, refusal);
            continue;
          }
          failed = true; // no further requests; those in flight are cancelled
          for (const call of active) call.cancel();
          throw refusal;
        }
      }
    };
    const workers = Math.min(this.maxConcurrency, batches.length);
    await Promise.all(Array.from({ length: workers }, worker));
    if (refusals.size) throw mergeRefusals(refusals);
    return results.flat();
  }

  private async runBatch(batch: string[], start: StartCall, active: Set<Stream>): Promise<CompletedItem[]> {
    const assembler = new StreamAssembler(batch.length);
    const packed = this.packed;
    const call = start(
      batch.map((sequence) => ({ sequence })),
      this.metadata(),
      this.deadline(),
      packed,
    );
    active.add(call);
    let olderServer = false; // one from before the packed methods: call the plain ones
    try {
      for await (const message of call) {
        if (packed) for (const response of (message as PackedResponse).responses) assembler.add(response);
        else assembler.add(message as Response);
      }
    } catch (error) {
      olderServer = packed && isServiceError(error) && error.code === status.UNIMPLEMENTED;
      if (!olderServer) throw error;
      this.packed = false;
    } finally {
      active.delete(call);
      call.cancel(); // a no-op once the stream has ended
    }
    return olderServer ? this.runBatch(batch, start, active) : assembler.finish();
  }
}

function isServiceError(error: unknown): error is ServiceError {
  return typeof error === "object" && error !== null && "code" in error && "metadata" in error;
}

function lookup<V>(table: Record<string, V>, name: string, what: string): V {
  if (!(name in table)) throw new RangeError(`unknown ${what} "${name}"; valid: ${Object.keys(table).join(", ")}`);
  return table[name];
}

function single(item: CompletedItem, index: number, kind: Include): Tensor | undefined {
  const found = [...item.tensors].filter(([key]) => key.startsWith(`${kind}/`));
  if (found.length > 1) throw new ResultStreamError(`item ${index}: ${found.length} ${kindName(kind)} tensors`);
  return found[0]?.[1];
}

function byLayer(item: CompletedItem, kind: Include): Map<number, Tensor> {
  const found = [...item.tensors].filter(([key]) => key.startsWith(`${kind}/`));
  return new Map(found.map(([key, tensor]) => [Number(key.split("/")[1]), tensor] as [number, Tensor]).sort((a, b) => a[0] - b[0]));
}

function encodeResult(item: CompletedItem, index: number, include: Include[], layers: number[]): EncodeResult {
  for (const kind of include) {
    if (!LAYERED.has(kind)) {
      if (!single(item, index, kind)) throw new ResultStreamError(`item ${index}: no ${kindName(kind)} tensor`);
      continue;
    }
    for (const layer of layers) {
      if (!item.tensors.has(tensorKey(kind, layer))) {
        throw new ResultStreamError(`item ${index}: no ${kindName(kind)} tensor for layer ${layer}`);
      }
    }
  }
  return {
    sequenceIndex: index,
    embeddings: byLayer(item, Include.INCLUDE_MEAN),
    perToken: byLayer(item, Include.INCLUDE_PER_TOKEN),
    bos: byLayer(item, Include.INCLUDE_BOS),
    contacts: single(item, index, Include.INCLUDE_CONTACTS),
    logits: single(item, index, Include.INCLUDE_LOGITS),
    attentions: single(item, index, Include.INCLUDE_ATTENTIONS),
    vocabTokens: item.complete.vocabTokens,
    model: item.complete.model,
  };
}
