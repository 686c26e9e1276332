export {
  Esm2Client,
  MAX_ITEMS_PER_REQUEST,
  type ClientOptions,
  type DtypeName,
  type EncodeOptions,
  type EncodeResult,
  type IncludeName,
  type PredictResult,
} from "./client";
export { Esm2Error, REQUEST_ID_KEY, type Violation } from "./errors";
export { ResultStreamError, type Tensor } from "./tensor";
export * as esm2v1 from "./gen/esm2/v1/esm2";
