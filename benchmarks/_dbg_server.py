import logging, sys
logging.basicConfig(level=logging.INFO)
logging.getLogger("fedmoe.coordinator.phases").setLevel(logging.DEBUG)
from benchmarks._realsize_server import main
main()
