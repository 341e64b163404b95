// polyattn/polyattn.hpp — umbrella header: the whole public API of polyattn.
#pragma once

#include "config.hpp"
#include "version.hpp"
#include "tensor_view.hpp"
#include "options.hpp"
#include "softmax.hpp"
#include "flash.hpp"
#include "polynomial.hpp"
#include "segments.hpp"
#include "linear.hpp"
#include "sketch.hpp"
#include "polysketch.hpp"
#include "sketched.hpp"
#include "cache.hpp"
#include "shaped.hpp"
#include "compress.hpp"
