# make help: the project's everyday commands. Each one sets up what it needs first (venv, Kafka jars).
.PHONY: help demo test test-cluster lint kafka-start kafka-stop

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

demo:  ## set up, then run `detector demo` on the embedded simulated fleet
	@venv="$$(bash .ci/setup.sh)" && "$$venv/bin/detector" demo

test:  ## set up, then run the whole test suite: unit + real-Kafka integration, then the 3-node cluster test
	@bash .ci/test.sh
	@bash .ci/test.sh -m cluster

test-cluster:  ## set up, then run only the broker-failure test on a 3-node Kafka cluster (pytest -m cluster)
	@bash .ci/test.sh -m cluster

lint:  ## ruff on the code
	@venv="$$(bash .ci/setup.sh)" && "$$venv/bin/ruff" check detector consumers tests bench

kafka-start:  ## start a local single-node Kafka (KRaft) for development; prints KAFKA_BOOTSTRAP
	@bash deploy/kafka/kafka.sh start .kafka

kafka-stop:  ## stop it
	@bash deploy/kafka/kafka.sh stop .kafka
