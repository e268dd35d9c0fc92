"""`python benchmarks/serve_uvicorn.py --config FILE`: `python -m router.serve` on uvicorn's own
httptools protocol instead of the fast server's, so benchmarks/overhead.py (--server uvicorn) can measure
what router/server/http/fastserver.py saves. Kept out of the router package: production has one server."""
import sys

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from router.serve import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], http=HttpToolsProtocol))
