"""The gRPC metadata keys of the contract, shared by the frontend and the clients."""

# Sent by clients: `authorization: Token <token>` (when the service requires tokens).
AUTHORIZATION = "authorization"
# Sent back by the frontend in the trailers of every Encode and Predict call, successful
# or not: the id its logs name the call by, for a user to quote.
REQUEST_ID = "esm2-request-id"
